"""The SADM formulation options of the method study: what D sees (low-passed real side, shared instance
noise, pooling), the diagnostics, fp32 structure term under autocast, and DiffFit."""

import pytest
import torch
from diffusers import DDPMScheduler

from sadm_finetune.terms.sadm.config import SADMConfig
from sadm_finetune.diffusion.process import DDPMProcess
from sadm_finetune.terms.sadm.discriminator import StructureDiscriminator
from sadm_finetune.terms.sadm.objective import SADMObjective, fixed_structure_gap, paired_augment, wiener_lowpass

PROCESS = DDPMProcess(DDPMScheduler(beta_schedule="linear").config, "cpu")
ALPHAS = PROCESS.alphas_cumprod


def _disc(**kw):
    torch.manual_seed(0)
    return StructureDiscriminator(in_channels=4, base_channels=8, num_blocks=2, embed_dim=16, **kw)


def _objective(**kw):
    return SADMObjective(SADMConfig(**kw), PROCESS)


def test_wiener_lowpass_keeps_everything_at_high_snr_and_nothing_at_zero_snr():
    z = torch.randn(4, 4, 8, 8)
    assert torch.allclose(wiener_lowpass(z, torch.full((4,), 1e8)), z, atol=1e-4)
    assert wiener_lowpass(z, torch.full((4,), 1e-8)).abs().max() < 1e-5
    mid = wiener_lowpass(z, torch.full((4,), 1.0))
    assert mid.shape == z.shape and mid.dtype == z.dtype
    assert 0 < mid.pow(2).sum() < z.pow(2).sum()  # a shrinkage, never an amplification


def test_wiener_lowpass_removes_more_detail_at_higher_noise():
    z = torch.randn(8, 4, 8, 8)
    energies = [wiener_lowpass(z, torch.full((8,), s)).pow(2).sum().item() for s in (0.1, 1.0, 10.0)]
    assert energies[0] < energies[1] < energies[2]


def test_renoise_shares_one_noise_draw_at_a_common_lower_level():
    obj = _objective(disc_renoise=0.5)
    latents, x0_hat = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 10, 101, 500, 999])
    real, fake, t_disc = obj.disc_inputs(latents, x0_hat, t, torch.Generator().manual_seed(0))
    assert torch.equal(t_disc, torch.tensor([0, 0, 5, 50, 250, 499]))
    ab = ALPHAS[t_disc].reshape(-1, 1, 1, 1)
    # shared noise: the difference of the two sides is the scaled difference of the clean inputs
    assert torch.allclose(real - fake, ab.sqrt() * (latents - x0_hat), atol=1e-5)
    assert not torch.allclose(real, ab.sqrt() * latents, atol=1e-3)  # noise was added


def test_pool_and_lowpass_change_what_d_sees_and_default_changes_nothing():
    latents, x0_hat, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,))
    real, fake, t_disc = _objective().disc_inputs(latents, x0_hat, t)
    assert torch.equal(real, latents) and torch.equal(fake, x0_hat) and torch.equal(t_disc, t)
    real, fake, _ = _objective(disc_pool=2).disc_inputs(latents, x0_hat, t)
    assert real.shape == fake.shape == (4, 4, 4, 4)
    real, fake, _ = _objective(disc_real_lowpass=True).disc_inputs(latents, x0_hat, t)
    assert torch.equal(fake, x0_hat) and not torch.allclose(real, latents)


def test_paired_augment_moves_and_cuts_each_samples_real_and_fake_alike():
    b = 64
    spot = torch.zeros(b, 2, 16, 16)
    spot[:, :, 8, 8] = 1.0
    real, fake = paired_augment(spot, spot.clone(), "translation", torch.Generator().manual_seed(0))
    assert torch.equal(real, fake) and real.shape == spot.shape
    moved = real[:, 0].flatten(1).argmax(dim=1)
    dy, dx = moved // 16 - 8, moved % 16 - 8
    assert dy.abs().max() == dx.abs().max() == 2  # up to 1/8 of the side each way, and it does move
    assert (dy != 0).any() and (dx != 0).any() and real.sum() == spot.sum()  # nothing lost away from the border

    ones = torch.ones(b, 2, 16, 16)
    real, fake = paired_augment(ones, 2 * ones, "cutout", torch.Generator().manual_seed(0))
    assert torch.equal(2 * real, fake)  # one mask per sample, the same on both sides
    cut = (real[:, 0] == 0).sum(dim=(1, 2))
    assert cut.max() == 64 and cut.min() > 0  # an 8x8 square, clipped where it meets the border
    assert torch.equal(real[:, 0] == 0, real[:, 1] == 0)  # every channel alike

    x = torch.randn(b, 2, 16, 16, requires_grad=True)
    real, fake = paired_augment(ones, x, "translation,cutout", torch.Generator().manual_seed(0))
    fake.sum().backward()  # differentiable in the predicted side: the gradient is the kept pixels' mask
    assert set(x.grad.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(x.grad.sum(dim=(1, 2, 3)), (real != 0).sum(dim=(1, 2, 3)).float())


def test_d_sees_the_augmented_pair_only_with_the_option():
    latents, x0_hat, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,))
    real, fake, _ = _objective(disc_augment="cutout").disc_inputs(latents, x0_hat, t, torch.Generator().manual_seed(0))
    assert not torch.equal(real, latents) and torch.equal(real == 0, fake == 0)
    import typing

    from sadm_finetune.config.fields import coerce
    from sadm_finetune.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="disc_augment: got 'flip'; set disc_augment to one of 'none', 'translation'"):
        coerce("disc_augment", typing.get_type_hints(SADMConfig)["disc_augment"], "flip")  # a recipe's typo


VARIANTS = [{}, {"disc_renoise": 1.0}, {"disc_real_lowpass": True}, {"disc_pool": 2},
            {"disc_augment": "translation,cutout"},
            {"disc_renoise": 0.5, "disc_real_lowpass": True, "disc_pool": 2},
            {"timestep_weighting": "cutoff"}, {"disc_spectral_norm": False}]


@pytest.mark.parametrize("options", VARIANTS)
def test_every_variant_reaches_the_denoiser_only_through_x0_hat(options):
    sn = options.pop("disc_spectral_norm", True)
    disc, obj = _disc(spectral_norm=sn), _objective(**options)
    latents = torch.randn(6, 4, 8, 8, requires_grad=True)
    x0_hat = torch.randn(6, 4, 8, 8, requires_grad=True)
    t = torch.tensor([5, 50, 100, 200, 250, 299])  # below the cut-off, so every variant has weight
    loss, logs = obj.generator_loss(disc, latents, x0_hat, t, None, torch.Generator().manual_seed(0))
    loss.backward()
    assert x0_hat.grad is not None and x0_hat.grad.abs().sum() > 0
    assert latents.grad is None
    assert all(p.grad is None for p in disc.parameters())
    assert -1.0 <= logs["d_pair_cos"].item() <= 1.0

    # and D's own loss trains D only
    latents.grad = x0_hat.grad = None
    loss_d, _ = obj.discriminator_loss(disc, latents, x0_hat, t, None, torch.Generator().manual_seed(0))
    loss_d.backward()
    assert latents.grad is None and x0_hat.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_fixed_structure_gap_is_zero_for_identical_batches_and_positive_otherwise():
    z = torch.randn(6, 4, 8, 8)
    w = torch.ones(6)
    assert fixed_structure_gap(z, z.clone(), w).item() == pytest.approx(0.0, abs=1e-10)
    assert fixed_structure_gap(z, torch.randn(6, 4, 8, 8), w).item() > 1e-3
    assert "structure_gap_fixed" in _objective().diagnostics(z, z, torch.randint(0, 1000, (6,)))


def test_structure_term_is_fp32_under_bf16_autocast_and_matches_the_fp32_gradient():
    """Only D's forward runs under autocast; relations and L_S are fp32 (with bf16 relations the gradient was
    off by 5-13% at L_S ~ 3e-5)."""
    torch.manual_seed(0)
    obj = _objective(timestep_weighting="none")
    t = torch.randint(0, 1000, (16,))
    real = torch.nn.functional.normalize(torch.randn(16, 16), dim=1)
    fake0 = torch.nn.functional.normalize(real + 0.003 * torch.randn(16, 16), dim=1)

    def structure(autocast: bool):
        fake = fake0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = obj._loss(real, fake, t)
        loss.backward()
        return loss, fake.grad

    ref_loss, ref_grad = structure(False)
    loss, grad = structure(True)
    assert loss.dtype == torch.float32 and 1e-7 < ref_loss.item() < 1e-3
    assert torch.allclose(loss, ref_loss, rtol=1e-6) and torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-12)

    # end to end: D itself computes in fp32 under bf16 autocast too (test_d_in_fp32_... bounds the error)
    disc = _disc(spectral_norm=False)
    seen = []
    disc.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    latents = torch.randn(16, 4, 8, 8)
    x = (latents + torch.randn_like(latents)).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = SADMObjective(obj.config, PROCESS).generator_loss(disc, latents, x, t, None)
    loss.backward()
    assert loss.dtype == torch.float32 and seen == [torch.float32]


def _structure_grad(disc, latents, x0_hat, t, autocast):
    """d L_S / d x0_hat with D called the way a prepared model is: its forward wrapped in `autocast`
    (accelerate's convert_outputs_to_fp32(autocast(forward)))."""
    forward = disc.forward
    disc.forward = lambda *a, **k: autocast()(forward)(*a, **k)
    try:
        x = x0_hat.clone().requires_grad_(True)
        loss, _ = SADMObjective(SADMConfig(timestep_weighting="none"), PROCESS).generator_loss(
            disc, latents, x, t, None)
        loss.backward()
        return x.grad
    finally:
        del disc.forward


@pytest.mark.parametrize("noise", [1.0, 0.1, 0.01])
def test_d_in_fp32_keeps_the_structure_gradient_exact_under_bf16_autocast(noise):
    """The issue: with D's forward in bf16 the structure gradient w.r.t. x0_hat was off by 15-22% at
    x0_hat = z0 + 0.1 n and 100-200% at 0.01 n. D computes in fp32 now: <= 1% at every noise level."""
    t = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        torch.manual_seed(seed)
        disc = StructureDiscriminator(in_channels=4, base_channels=16, num_blocks=2, embed_dim=32)
        latents = torch.randn(16, 4, 8, 8)
        x0_hat = latents + noise * torch.randn_like(latents)
        ref = _structure_grad(disc, latents, x0_hat, t, lambda: torch.autocast("cpu", enabled=False))
        bf16 = _structure_grad(disc, latents, x0_hat, t, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        assert ((bf16 - ref).norm() / ref.norm()).item() <= 0.01


@pytest.mark.slow
def test_a_run_with_every_d_input_option_trains_and_logs_the_diagnostics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from launch import tiny_run_args, train_in_process
    from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=4)
    out = tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=3) + ["--structure_weight", "0.1", "--disc_renoise", "0.5",
                                                     "--disc_real_lowpass", "--disc_pool", "2",
                                                     "--disc_augment", "translation,cutout",
                                                     "--pair_weighting", "min", "--structure_grad_bands", "2",
                                                     "--adaptive_weight"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"structure_gap_fixed", "d_pair_cos", "structure_loss_g", "structure_loss_d"} <= tags, tags
    assert len(events.Scalars("d_pair_cos")) == 3
    assert {"grad_sadm_band0", "grad_mse_band1", "grad_share_sadm_band1", "structure_adaptive_factor"} <= tags, tags

    # the control without structure trains through the CLI too; its D (with the score head) is saved
    out2 = tmp_path / "out2"
    proc = train_in_process(tiny_run_args(base, data, out2, steps=2) + ["--structure_weight", "0.1",
                                                                      "--adversarial_loss", "per_sample_ns"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    disc = StructureDiscriminator.from_pretrained(out2 / "structure_discriminator", use_safetensors=True)
    assert disc.score is not None


# -- the mechanism study's controls and pair weights (issue: what does SADM do?) --------------------------


def _eps_push(pair_weighting: str, t_noisy: int) -> float:
    """|d L_S / d eps_hat| of one noisy sample in a batch of clean ones (epsilon model), D fixed."""
    torch.manual_seed(0)
    disc = _disc(spectral_norm=False)
    obj = _objective(pair_weighting=pair_weighting, structure_snr_gamma=5.0)
    latents = torch.randn(8, 4, 8, 8)
    t = torch.tensor([t_noisy] + [10] * 7)
    noise = torch.randn_like(latents)
    noisy = PROCESS.add_noise(latents, noise, t)
    # the noise prediction whose x0_hat is z0 + 0.1 n: the same error in latent space at every level
    ab = PROCESS.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x0_target = latents + 0.1 * torch.randn_like(latents)
    eps_hat = ((noisy - ab.sqrt() * x0_target) / (1 - ab).sqrt()).requires_grad_(True)
    loss, _ = obj.generator_loss(disc, latents, PROCESS.x0_hat(eps_hat, noisy, t), t, None)
    loss.backward()
    return eps_hat.grad[0].norm().item()


def test_min_pair_weights_bound_the_noisy_samples_push_where_geometric_ones_do_not():
    """Geometric weights sqrt(w_i w_j) give a noisy sample's noise prediction a push that does not shrink with
    its noise level (1/sqrt(gamma) from the weights); min(w_i, w_j) makes it vanish as SNR -> 0."""
    for t in (300, 500, 700, 900):
        w = min(PROCESS.snr(torch.tensor([t])).item(), 5.0) / 5.0
        # every pair of the noisy sample has a clean partner (w_j = 1): min / geometric = w_i / sqrt(w_i)
        assert _eps_push("min", t) / _eps_push("geometric", t) == pytest.approx(w ** 0.5, rel=1e-3)
    # so the push under min weights falls with the noise level far faster than under geometric ones
    geo, low = [_eps_push("geometric", t) for t in (300, 700)], [_eps_push("min", t) for t in (300, 700)]
    assert low[1] / low[0] < 0.2 * geo[1] / geo[0]


def test_per_sample_control_has_no_pairs_and_plays_the_gan_game():
    """adversarial_loss=per_sample_*: sample i's gradient does not depend on any other sample (no structure),
    D's step lowers its GAN loss and the denoiser's step raises D's score of x0_hat."""
    for kind in ("per_sample_ns", "per_sample_hinge"):
        torch.manual_seed(0)
        disc = _disc(score_head=True)
        obj = _objective(adversarial_loss=kind, timestep_weighting="none")
        latents, t = torch.randn(6, 4, 8, 8), torch.randint(0, 1000, (6,))
        fake = torch.randn(6, 4, 8, 8)

        def grad_of_first(x):
            x = x.clone().requires_grad_(True)
            obj.generator_loss(disc, latents, x, t, None)[0].backward()
            return x.grad[0]

        other = fake.clone()
        other[1:] = torch.randn(5, 4, 8, 8)
        assert torch.allclose(grad_of_first(fake), grad_of_first(other), atol=1e-7)

        opt = torch.optim.SGD(disc.parameters(), lr=0.1)
        before, _ = obj.discriminator_loss(disc, latents, fake, t, None)
        before.backward()
        opt.step()
        after, logs = obj.discriminator_loss(disc, latents, fake, t, None)
        assert after.item() < before.item() and "d_score_gap" in logs

        x = fake.clone().requires_grad_(True)
        loss, logs = obj.generator_loss(disc, latents, x, t, None)
        loss.backward()
        with torch.no_grad():
            moved = x - 0.5 * x.grad / x.grad.norm()
            assert obj.generator_loss(disc, latents, moved, t, None)[1]["d_score_fake"] > logs["d_score_fake"]


def test_relations_couple_the_samples_unlike_the_per_sample_control():
    torch.manual_seed(0)
    disc, obj = _disc(), _objective(timestep_weighting="none")
    latents, t, fake = torch.randn(6, 4, 8, 8), torch.randint(0, 1000, (6,)), torch.randn(6, 4, 8, 8)
    grads = []
    for x in (fake, torch.cat([fake[:1], torch.randn(5, 4, 8, 8)])):
        x = x.clone().requires_grad_(True)
        obj.generator_loss(disc, latents, x, t, None)[0].backward()
        grads.append(x.grad[0])
    assert not torch.allclose(grads[0], grads[1], atol=1e-7)


def test_the_score_head_leaves_the_default_discriminator_bit_identical():
    torch.manual_seed(0)
    plain = StructureDiscriminator(in_channels=4, base_channels=8, num_blocks=2, embed_dim=16)
    torch.manual_seed(0)
    scored = StructureDiscriminator(in_channels=4, base_channels=8, num_blocks=2, embed_dim=16, score_head=True)
    shared = plain.state_dict()
    assert all(torch.equal(v, scored.state_dict()[k]) for k, v in shared.items())
    assert set(scored.state_dict()) - set(shared) and plain.score is None
    with pytest.raises(ValueError, match="score head"):
        plain(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), return_score=True)


def _term(**sadm):
    from types import SimpleNamespace

    from sadm_finetune.config.run import RunConfig
    from sadm_finetune.terms.sadm.term import SADMTerm

    config = RunConfig(sadm=SADMConfig(disc_width=8, disc_depth=2, disc_embed_dim=16, structure_warmup_steps=0,
                                       **sadm))
    adapter = SimpleNamespace(latent_channels=4, num_classes=0)
    torch.manual_seed(0)
    return SADMTerm(config, adapter, PROCESS, 1e-8)


def _ctx(step=0, batch=8):
    from sadm_finetune.terms import StepContext

    g = torch.Generator().manual_seed(3)
    latents, noise = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.arange(batch) * (1000 // batch)
    noisy = PROCESS.add_noise(latents, noise, t)
    pred = (noise + 0.2 * torch.randn(noise.shape, generator=g)).requires_grad_(True)
    return StepContext(step, {}, latents, noise, t, noisy, {}, pred, PROCESS.x0_hat(pred, noisy, t), g)


def _sgd_update(optimizer, scheduler, loss, params, max_norm):
    from sadm_finetune.terms import UpdateResult

    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return UpdateResult(True, False, torch.tensor(0.0))


def test_a_frozen_discriminator_never_moves_and_a_live_one_does():
    for frozen in (True, False):
        term = _term(disc_frozen=frozen)
        before = {k: v.clone() for k, v in term.disc.state_dict().items()}
        for step in range(3):
            ctx = _ctx(step)
            value, _ = term.loss(ctx)
            logs, result = term.phase(ctx, _sgd_update)
            assert (result is None) == frozen
        same = all(torch.equal(v, term.disc.state_dict()[k]) for k, v in before.items())
        assert same == frozen


def test_gradient_bands_split_the_push_by_noise_level():
    term = _term(structure_grad_bands=4, structure_weight=0.5)
    ctx = _ctx(batch=8)
    value, logs = term.loss(ctx)
    keys = {f"grad_{w}_band{k}" for w in ("sadm", "mse", "share_sadm") for k in range(4)}
    assert keys <= set(logs)
    # band k holds timesteps [250k, 250(k+1)): the MSE gradient per band equals the hand computation
    target = ctx.noise
    g = 2 * (ctx.model_pred.detach() - target) / ctx.model_pred.numel()
    norms = g.flatten(1).norm(dim=1)
    for k in range(4):
        assert logs[f"grad_mse_band{k}"].item() == pytest.approx(norms[2 * k: 2 * k + 2].mean().item(), rel=1e-5)
        share = logs[f"grad_share_sadm_band{k}"].item()
        assert 0 < share < 1
    # lambda scales the structure part linearly
    half = _term(structure_grad_bands=4, structure_weight=0.25).loss(_ctx(batch=8))[1]
    assert half["grad_sadm_band0"].item() == pytest.approx(0.5 * logs["grad_sadm_band0"].item(), rel=1e-4)
    value.backward()  # the diagnostic kept the graph: the denoiser's backward still works
    assert ctx.model_pred.grad is not None


def test_the_adaptive_weight_makes_the_structure_gradient_a_fixed_fraction_of_the_denoising_one():
    """adaptive_weight: lambda * L_S's gradient at the denoiser's output has norm lambda * ||dL_diff/d out||."""
    term = _term(adaptive_weight=True, structure_weight=0.05)
    ctx = _ctx(batch=8)
    ctx.loss_diffusion = (ctx.model_pred - ctx.noise).pow(2).mean()
    value, logs = term.loss(ctx)
    assert logs["structure_adaptive_factor"].item() > 0
    (g_s,) = torch.autograd.grad(0.05 * value, ctx.model_pred, retain_graph=True)
    (g_d,) = torch.autograd.grad(ctx.loss_diffusion, ctx.model_pred, retain_graph=True)
    assert g_s.norm().item() == pytest.approx(0.05 * g_d.norm().item(), rel=1e-4)
    clamped = _term(adaptive_weight=True, adaptive_weight_max=1e-3)
    ctx2 = _ctx(batch=8)
    ctx2.loss_diffusion = (ctx2.model_pred - ctx2.noise).pow(2).mean()
    assert clamped.loss(ctx2)[1]["structure_adaptive_factor"].item() == pytest.approx(1e-3)


# -- relations in a semantic space (--disc_space features) ---------------------------------------------------------


def _feature_space(tmp_path):
    from diffusers import AutoencoderKL
    from tiny_encoders import build_tiny_encoder

    from sadm_finetune.terms.sadm.feature_space import FeatureSpace

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=16)
    encoder = build_tiny_encoder(tmp_path / "enc")
    return FeatureSpace.from_pretrained(vae, str(encoder), 28), str(encoder)


def test_feature_space_d_reads_the_encoders_features_and_l_s_reaches_x0_hat_through_it(tmp_path):
    space, encoder = _feature_space(tmp_path)
    config = SADMConfig(disc_space="features", disc_encoder=encoder, disc_encoder_resolution=28)
    obj = SADMObjective(config, PROCESS)
    obj.space = space
    latents, x0_hat = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8).requires_grad_(True)
    t = torch.tensor([10, 200, 400, 600, 800, 999])
    real, fake, _ = obj.disc_inputs(latents, x0_hat, t)
    assert real.shape == fake.shape == (6, 16, 4, 4)  # the tiny DINOv2: 16 channels on a 28/7 = 4x4 patch grid
    assert not real.requires_grad and fake.requires_grad  # the real side builds no graph
    torch.manual_seed(0)
    disc = StructureDiscriminator(in_channels=16, base_channels=8, num_blocks=2, embed_dim=16)
    loss, _ = obj.generator_loss(disc, latents, x0_hat, t, None)
    loss.backward()
    assert x0_hat.grad.abs().sum() > 0  # through the encoder and the VAE decoder
    assert all(p.grad is None for p in space.vae.parameters())  # the frozen networks never train
    assert all(p.grad is None for p in space.encoder.model.parameters())
    # without the space, D reads the latents themselves: the default is unchanged
    real_latent, _, _ = SADMObjective(SADMConfig(), PROCESS).disc_inputs(latents, x0_hat, t)
    assert torch.equal(real_latent, latents)


def test_a_feature_space_run_trains_saves_d_on_the_encoders_width_and_sadm_eval_probes_it(tmp_path):
    from launch import tiny_run_args, train_in_process
    from tiny_encoders import build_tiny_encoder
    from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

    from sadm_finetune.terms.sadm.probe import load_discriminator, probe
    from diffusers import DiTPipeline

    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=4)
    encoder = build_tiny_encoder(tmp_path / "enc")
    out = tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=2) + ["--structure_weight", "0.1", "--disc_space", "features",
                                                     "--disc_encoder", str(encoder), "--disc_encoder_resolution", "28"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    disc, options = load_discriminator(str(out), "cpu")
    assert disc.config.in_channels == 16 and options.disc_space == "features"
    pipe = DiTPipeline.from_pretrained(out)
    images = (torch.rand(4, 32, 32, 3) * 255).to(torch.uint8).numpy()
    result = probe(pipe, images, [0, 1, 0, 1], None, timesteps=(100, 500), disc=disc, sadm_options=options)
    assert len(result["d_pair_cos"]) == 2 and all(-1 <= c <= 1 for c in result["d_pair_cos"])


def test_a_plain_run_with_a_batch_of_one_trains_with_the_default_diagnostics(tmp_path):
    """structure_diagnostics is on by default; a batch of one has no pairs, so the probe logs nothing that step."""
    from launch import tiny_run_args, train_in_process
    from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=2)
    proc = train_in_process(tiny_run_args(base, data, tmp_path / "out", steps=2)
                            + ["--structure_weight", "0", "--train_batch_size", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "model_index.json").is_file()


def test_the_per_sample_surrogate_restricted_to_some_samples_is_the_push_that_lands_on_them():
    """--grad_bands: L_S couples pairs; restricted to a set S, the surrogate's gradient is L_S's with the x0_hat of the
    samples outside S detached (computed here by detaching them and recomputing L_S); over all samples, L_S's."""
    term = _term(structure_weight=0.5)
    ctx = _ctx(batch=8)
    value, _ = term.loss(ctx)
    per_sample = term.per_sample_loss(ctx, value)
    assert per_sample.shape == (8,)
    inside = ctx.timesteps < 500  # the cleaner half
    (restricted,) = torch.autograd.grad((per_sample * inside).sum() / 8, ctx.model_pred, retain_graph=True)
    (whole,) = torch.autograd.grad(per_sample.mean(), ctx.model_pred, retain_graph=True)
    other = _ctx(batch=8)
    keep = inside[:, None, None, None]
    other.x0_hat = torch.where(keep, other.x0_hat, other.x0_hat.detach())
    value_detached, _ = term.loss(other)
    assert torch.equal(value_detached, value)
    (expected,) = torch.autograd.grad(value_detached, other.model_pred)
    torch.testing.assert_close(restricted, expected)
    assert restricted[~inside].abs().max() == 0 and restricted[inside].abs().max() > 0
    torch.testing.assert_close(whole, torch.autograd.grad(value, ctx.model_pred)[0])
