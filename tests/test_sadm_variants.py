"""The SADM formulation options of the method study: what D sees (low-passed real side, shared instance
noise, pooling), the diagnostics, fp32 structure term under autocast, and DiffFit."""

import pytest
import torch
from diffusers import DDPMScheduler

from sadm_finetune.config import SADMConfig
from sadm_finetune.noise import DDPMProcess
from sadm_finetune.models.discriminator import StructureDiscriminator
from sadm_finetune.sadm import SADMObjective, fixed_structure_gap, wiener_lowpass

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


VARIANTS = [{}, {"disc_renoise": 1.0}, {"disc_real_lowpass": True}, {"disc_pool": 2},
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

    # end to end: D runs in bf16 (its own rounding is the only difference), the loss comes back fp32
    disc = _disc(spectral_norm=False)
    seen = []
    disc.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    latents = torch.randn(16, 4, 8, 8)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    grads = []
    for objective in (SADMObjective(obj.config, PROCESS), SADMObjective(obj.config, PROCESS, autocast=bf16)):
        x = (latents + torch.randn_like(latents)).requires_grad_(True)
        torch.manual_seed(1)
        x = (latents + torch.randn_like(latents)).requires_grad_(True)
        loss, _ = objective.generator_loss(disc, latents, x, t, None)
        loss.backward()
        assert loss.dtype == torch.float32
        grads.append(x.grad)
    assert seen == [torch.float32, torch.bfloat16]
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 0.2


@pytest.mark.slow
def test_a_run_with_every_d_input_option_trains_and_logs_the_diagnostics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from launch import tiny_run_args, train_in_process
    from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=4)
    out = tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=3) + ["--structure_weight", "0.1", "--disc_renoise", "0.5",
                                                     "--disc_real_lowpass", "--disc_pool", "2"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"structure_gap_fixed", "d_pair_cos", "structure_loss_g", "structure_loss_d"} <= tags, tags
    assert len(events.Scalars("d_pair_cos")) == 3
