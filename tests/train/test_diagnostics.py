"""train/diagnostics.py (--grad_bands): each term's per-band gradient norm on the denoiser's parameters against a
hand-computed one, the shares, empty bands and zero weights, a term it cannot measure, and, on the tiny DiT through
the loop, the keys of every term (SADM, REPA, SD-DiT, the denoising loss) and weights equal with and without it."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from sadm_finetune.config.run import TrainingConfig
from sadm_finetune.terms import StepContext, Term
from sadm_finetune.train.checkpointing import TrainState
from sadm_finetune.train.diagnostics import GradBands, band_of
from sadm_finetune.train.loop import train_loop
from sadm_finetune.utils.errors import ConfigError
from tiny_encoders import build_tiny_encoder
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

T = 1000


def linear_problem(batch=5, d_in=3, d_out=4):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(d_out, d_in, generator=g).requires_grad_(True)
    x, y = torch.randn(batch, d_in, generator=g), torch.randn(batch, d_out, generator=g)
    per_sample = (x @ weight.T - y).pow(2).mean(dim=1)  # (B,) MSE per sample
    return weight, x, y, per_sample


def test_the_band_norm_is_the_hand_computed_gradient_of_the_bands_samples():
    weight, x, y, per_sample = linear_problem()
    timesteps = torch.tensor([0, 100, 600, 999, 700])  # K = 2: band 0 holds samples 0, 1; band 1 holds 2, 3, 4
    assert band_of(timesteps, 2, T).tolist() == [0, 0, 1, 1, 1]
    probe = GradBands(2, 1, T, [weight])
    probe.add("diffusion", 1.0, per_sample)
    probe.add("other", 0.5, 3 * per_sample)
    logs = probe.measure(timesteps)
    b, d_out = x.shape[0], y.shape[1]
    residual = (x @ weight.detach().T - y)  # d/dW sum_{i in S} l_i / B = 2 / (B d_out) sum_{i in S} r_i x_i^T
    for k, members in ((0, [0, 1]), (1, [2, 3, 4])):
        hand = (2 / (b * d_out) * residual[members].T @ x[members]).norm()
        torch.testing.assert_close(logs[f"grad_band{k}_diffusion"], hand)
        torch.testing.assert_close(logs[f"grad_band{k}_other"], 1.5 * hand)  # lambda 0.5 x 3
        torch.testing.assert_close(logs[f"grad_share_band{k}_diffusion"], torch.tensor(1 / 2.5))
        torch.testing.assert_close(logs[f"grad_share_band{k}_diffusion"] + logs[f"grad_share_band{k}_other"],
                                   torch.tensor(1.0))
    assert weight.grad is None  # .grad never touched
    per_sample.sum().backward()  # and the graph is still there for the step's own backward


def test_an_empty_band_is_nan_and_a_term_at_weight_zero_has_share_zero():
    weight, _, _, per_sample = linear_problem()
    probe = GradBands(4, 1, T, [weight])
    probe.add("diffusion", 1.0, per_sample)
    probe.add("sadm", 0.0, None)  # at weight 0 the loop computes no loss
    logs = probe.measure(torch.tensor([0, 10, 800, 900, 999]))  # nothing in bands 1 (250-499) and 2 (500-749)
    assert set(logs) == {f"grad_{kind}band{k}_{name}" for kind in ("", "share_") for k in range(4)
                         for name in ("diffusion", "sadm")}
    for k in (1, 2):
        assert all(math.isnan(logs[f"grad_{kind}band{k}_{name}"]) for kind in ("", "share_")
                   for name in ("diffusion", "sadm"))
    for k in (0, 3):
        assert logs[f"grad_band{k}_sadm"] == 0 and logs[f"grad_share_band{k}_sadm"] == 0
        assert logs[f"grad_share_band{k}_diffusion"] == 1 and logs[f"grad_band{k}_diffusion"] > 0


class Pairwise(Term):
    """A loss that couples the batch (a scalar) and has no per-sample form."""

    name = "pairwise"

    def weight(self, step):
        return 1.0

    def loss(self, ctx):
        return torch.pdist(ctx.x0_hat.flatten(1)).mean(), {}


def test_a_term_without_a_per_sample_form_is_reported_once_and_left_out(caplog):
    weight, _, _, per_sample = linear_problem(batch=2)
    x0_hat = weight.sum() * torch.ones(2, 1, 2, 2)
    ctx = StepContext(0, {}, x0_hat.detach(), x0_hat.detach(), torch.tensor([0, 900]), x0_hat.detach(), {},
                      x0_hat, x0_hat, torch.Generator())
    term = Pairwise()
    probe = GradBands(2, 1, T, [weight])
    with caplog.at_level(logging.WARNING, logger="sadm_finetune.train.diagnostics"):
        for _ in range(2):
            probe.due(0, True, True)
            probe.add("diffusion", 1.0, per_sample)
            probe.add_term(term, ctx, 1.0, term.loss(ctx)[0])
            logs = probe.measure(ctx.timesteps)
    assert [r.getMessage() for r in caplog.records] == [
        "grad_bands: pairwise is not measurable (its loss is not per-sample and it does not implement "
        "Term.per_sample_loss); left out of the shares"]
    assert not any("pairwise" in key for key in logs) and logs["grad_share_band0_diffusion"] == 1


def test_due_every_n_updates_on_the_last_micro_batch_of_the_main_process():
    probe = GradBands(2, 10, T, [])
    assert [s for s in range(25) if probe.due(s, True, True)] == [0, 10, 20]
    assert not probe.due(10, False, True) and not probe.due(10, True, False)


def test_off_by_default_and_refused_where_the_denoiser_is_sharded():
    from accelerate.utils import DistributedType

    def run(bands, distributed_type):
        training = SimpleNamespace(grad_bands=bands, grad_bands_every=1)
        return SimpleNamespace(config=SimpleNamespace(training=training),
                               process=SimpleNamespace(num_train_timesteps=T), accelerator=SimpleNamespace(distributed_type=distributed_type),
                               denoiser=torch.nn.Linear(2, 2).requires_grad_(True))

    assert GradBands.for_run(run(0, DistributedType.FSDP)) is None
    assert len(GradBands.for_run(run(2, DistributedType.MULTI_GPU)).params) == 2
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ConfigError, match=r"^grad_bands: measures gradient norms over the whole denoiser") as e:
            GradBands.for_run(run(2, sharded))
        assert "\n" not in str(e.value)


def test_the_options_are_checked_in_one_line():
    for field, value in (("grad_bands", -1), ("grad_bands_every", 0)):
        with pytest.raises(ConfigError, match=rf"^{field}: ") as error:
            TrainingConfig(**{field: value})
        assert "\n" not in str(error.value)


# -- through the loop, on the tiny DiT ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """conftest's tiny DiT with 2 blocks (SD-DiT's encoder needs one left after it)."""
    tmp = tmp_path_factory.mktemp("train_bands")
    return SimpleNamespace(base=build_tiny_dit_pipeline(tmp / "base", num_classes=2, num_layers=2),
                           data=build_image_folder(tmp / "data", per_class=8))


def run_logged(r):
    logged = []
    r.accelerator.log = lambda values, step=None: logged.append(dict(values))
    train_loop(r.run, r.dataloader, r.dataset, TrainState(), lambda s: None)
    return logged


def test_the_diffusion_norm_in_the_loop_is_the_gradient_of_its_per_sample_loss(make_run):
    """Plain training (the tiny DiT has learned sigma: DiT's variational bound is part of the denoising loss): the
    logged norm equals one computed here from the loop's own per-sample losses on its graph, before its backward."""
    r = make_run(structure_weight=0.0, grad_bands=2, grad_bands_every=1, max_train_steps=1)
    run, captured, expected = r.run, {}, {}
    for name in ("diffusion_loss", "vlb"):
        original = getattr(run, name)
        setattr(run, name, lambda *a, _f=original, _n=name, **k: captured.setdefault(_n, _f(*a, **k)))
    timesteps = run.process.sample_timesteps
    run.process.sample_timesteps = lambda *a, **k: captured.setdefault("t", timesteps(*a, **k))
    backward = r.accelerator.backward

    def check_then_backward(loss, **kwargs):
        per_sample = captured["diffusion_loss"] + captured["vlb"]
        band = (captured["t"] * 2 // T)
        params = [p for p in run.denoiser.parameters() if p.requires_grad]
        for k in range(2):
            grads = torch.autograd.grad((per_sample * (band == k)).sum() / len(band), params, retain_graph=True)
            expected[k] = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
        return backward(loss, **kwargs)

    r.accelerator.backward = check_then_backward
    (logs,) = run_logged(r)
    assert {k for k in logs if k.startswith("grad_band")} == {"grad_band0_diffusion", "grad_band1_diffusion"}
    for k in range(2):
        if math.isnan(expected[k]) or (captured["t"] * 2 // T == k).sum() == 0:
            assert math.isnan(logs[f"grad_band{k}_diffusion"])
        else:
            assert logs[f"grad_band{k}_diffusion"] == pytest.approx(expected[k], rel=1e-5)
            assert logs[f"grad_share_band{k}_diffusion"] == 1


TERMS = dict(structure_weight=0.5, disc_warmup_steps=1, sddit_weight=0.5, sddit_encoder_depth=1, sddit_head_dim=16,
             sddit_head_hidden_dim=16, repa_weight=0.1, repa_depth=1, repa_projector_dim=16,
             repa_encoder_resolution=42, max_train_steps=2, use_ema=True)


def test_every_terms_share_per_band_and_training_unchanged(make_run, tmp_path):
    encoder = str(build_tiny_encoder(tmp_path / "encoder"))
    weights = []
    for bands in (0, 2):
        torch.manual_seed(0)  # entry.train's set_seed: the heads' and D's initialisation
        r = make_run(grad_bands=bands, grad_bands_every=1, repa_encoder=encoder, **TERMS)
        logs = run_logged(r)
        weights.append([p.detach().clone() for p in r.run.trainable_parameters] + [
            s.clone() for s in r.run.ema.shadow_params] + [
            p.detach().clone() for term in r.run.terms for m, _, _ in term.modules().values() for p in m.parameters()])
        if not bands:
            assert not any(key.startswith("grad_band") for row in logs for key in row)
            continue
        names = ("diffusion", "sadm", "repa", "sddit")
        for step, row in enumerate(logs):
            assert {k for k in row if k.startswith("grad_")} >= {
                f"grad_{kind}band{k}_{n}" for kind in ("", "share_") for k in range(2) for n in names}
            assert not any("structure_probe" in k for k in row)  # a term without a loss has no share
            for k in range(2):
                shares = [row[f"grad_share_band{k}_{n}"] for n in names]
                if math.isnan(shares[0]):  # no sample of this batch in band k
                    assert all(math.isnan(row[f"grad_band{k}_{n}"]) for n in names)
                    continue
                assert sum(shares) == pytest.approx(1.0)
                assert all(row[f"grad_band{k}_{n}"] > 0 for n in names if not (n == "sadm" and step == 0))
                if step == 0:  # SADM's discriminator warm-up: lambda 0 at the first update
                    assert row[f"grad_band{k}_sadm"] == 0 and row[f"grad_share_band{k}_sadm"] == 0
    assert len(weights[0]) == len(weights[1])
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))  # the diagnostic changed nothing
