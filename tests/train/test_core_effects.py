"""The core behaviours, measured by their effect in the real loop (`sadm-train` in this process, tiny DiT / SD):
each test turns red when its behaviour goes (the mutations each was checked against are named in its docstring).

Spies wrap `training.train_loop` to reach the prepared run: optimizer step hooks read the gradients and weights
at each update, and the SADM term's `log` (called every step) hands over the step's context (batch, noise,
timesteps, x0_hat), so the structure loss of a fixed discriminator can be measured before and after an update."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from launch import tiny_run_args, train_in_process
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

pytestmark = pytest.mark.slow


class Probe:
    """What one run's spies saw: per update, the denoiser's gradients and weights after the step; at step 0 the
    structure loss (L_S) of the step's D on the step's batch, before and after the denoiser's and D's updates."""

    def __init__(self, stop_after_first_update=False):
        self.stop_after_first_update = stop_after_first_update
        self.ctx = {}
        self.grads, self.weights = [], []
        self.names = None
        self.structure = {}

    def attach(self, run):
        sadm = next(term for term in run.terms if term.name == "sadm")
        log, loss = sadm.log, sadm.loss
        self.names = [n for n, p in run.unwrapped_denoiser.named_parameters() if p.requires_grad]
        params = [p for p in run.unwrapped_denoiser.parameters() if p.requires_grad]

        def spy_log(ctx):
            self.ctx.setdefault(ctx.step, ctx)
            return log(ctx)

        def structure_loss(x0_hat):  # the denoiser's L_S for D as it is now, on step 0's batch and noise
            with torch.no_grad():
                return loss(dataclasses.replace(self.ctx[0], x0_hat=x0_hat))[1]["structure_loss_g"].item()

        def fresh_x0_hat():  # the denoiser as it is now, on step 0's noisy latents
            ctx = self.ctx[0]
            with torch.no_grad():
                out = run.adapter.predict(run.denoiser, ctx.noisy_latents, ctx.timesteps, ctx.conditioning)
                return run.process.x0_hat(out.model_pred.float(), ctx.noisy_latents, ctx.timesteps)

        def before_denoiser_step(*_):
            self.grads.append([p.grad.detach().clone() for p in params])
            if len(self.grads) == 1:
                self.structure["before"] = structure_loss(self.ctx[0].x0_hat.detach())

        def after_denoiser_step(*_):
            self.weights.append([p.detach().clone() for p in params])
            if len(self.weights) == 1:
                self.structure["after_denoiser_step"] = structure_loss(fresh_x0_hat())
                if self.stop_after_first_update:
                    from sadm_finetune.utils.errors import SADMError

                    raise SADMError("probe: stopped after the first update")

        def before_disc_step(*_):
            if "before_disc_step" not in self.structure:
                self.structure["before_disc_step"] = structure_loss(self.ctx[0].x0_hat.detach())

        def after_disc_step(*_):
            if "after_disc_step" not in self.structure:
                self.structure["after_disc_step"] = structure_loss(self.ctx[0].x0_hat.detach())

        sadm.log = spy_log
        run.optimizer.optimizer.register_step_pre_hook(before_denoiser_step)
        run.optimizer.optimizer.register_step_post_hook(after_denoiser_step)
        sadm.optimizer.optimizer.register_step_pre_hook(before_disc_step)
        sadm.optimizer.optimizer.register_step_post_hook(after_disc_step)


def run_with_probe(monkeypatch, args, probe):
    import sadm_finetune.train.entry as training

    real = training.train_loop

    def spied(run, *rest):
        probe.attach(run)
        return real(run, *rest)

    monkeypatch.setattr(training, "train_loop", spied)
    return train_in_process(args)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("core")
    return build_tiny_dit_pipeline(root / "base", num_classes=2), build_image_folder(root / "data")


SADM_ARGS = ["--structure_weight", "10", "--disc_learning_rate", "1e-3", "--disc_renoise", "0", "--report_to", "none"]


@pytest.fixture(scope="module")
def sadm_runs(world, tmp_path_factory):
    """A: SADM on from step 0 (lambda 10), EMA 0.9, 3 updates, exported. B: the same run with lambda 0 at step 0
    (--disc_warmup_steps 1: the same D is built, it only does not enter the loss yet), stopped after its first
    update. Same seed: the same batch, noise, timesteps and initial weights."""
    base, data = world
    root = tmp_path_factory.mktemp("sadm_runs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        a = Probe()
        proc = run_with_probe(monkeypatch, tiny_run_args(base, data, root / "a", steps=3) + SADM_ARGS +
                              ["--use_ema", "--ema_decay", "0.9"], a)
        assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.MonkeyPatch.context() as monkeypatch:
        b = Probe(stop_after_first_update=True)
        proc = run_with_probe(monkeypatch, tiny_run_args(base, data, root / "b", steps=3) + SADM_ARGS +
                              ["--disc_warmup_steps", "1"], b)
        assert proc.returncode == 2 and "probe: stopped after the first update" in proc.stderr, proc.stderr[-3000:]
    assert a.structure["before"] == pytest.approx(b.structure["before"], rel=1e-6)  # same D, batch and weights
    return a, b, root / "a"


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_sadm_gradient_reaches_the_denoiser_through_x0_hat(sadm_runs):
    """Mutation: `x0_hat.detach()` in the loop's StepContext (SADM then adds a constant to the loss): the gradients
    of A and B become identical."""
    a, b, _ = sadm_runs
    g_a, g_b = _flat(a.grads[0]), _flat(b.grads[0])
    assert torch.isfinite(g_a).all()
    assert (g_a - g_b).norm() > 0.05 * g_b.norm(), ((g_a - g_b).norm(), g_b.norm())


def test_the_denoisers_step_lowers_and_ds_step_raises_the_structure_loss(sadm_runs):
    """For a fixed D, the denoiser's update lowers L_S more with SADM on than without it; D's update (on the same
    batch) raises L_S. Mutations: `loss - lam * value` in the loop (the denoiser climbs L_S), `-loss` in the loop's
    `update` for a term (D descends L_S), and the x0_hat detach above (A's step equals B's)."""
    a, b, _ = sadm_runs
    s_a, s_b = a.structure, b.structure
    assert s_a["after_denoiser_step"] < s_a["before"]
    assert s_a["after_denoiser_step"] < s_b["after_denoiser_step"] - 0.05 * abs(s_b["before"] - s_b["after_denoiser_step"])
    assert s_a["after_disc_step"] > s_a["before_disc_step"]


def test_the_export_is_the_ema_of_the_weights(sadm_runs):
    """The exported weights are diffusers' EMA of the weights after each update (decay 0 at the first update, then
    min(0.9, (1 + k) / (10 + k)) at the k-th after it), recomputed here from the weights the optimizer left.
    Mutations: no `ema.step` (the export is the initial weights), the raw weights exported instead of the EMA."""
    a, _, out = sadm_runs
    assert len(a.weights) == 3
    shadow = [w.clone() for w in a.weights[0]]
    for k, weights in enumerate(a.weights[1:], start=1):
        decay = min(0.9, (1 + k) / (10 + k))
        shadow = [decay * s + (1 - decay) * w for s, w in zip(shadow, weights)]
    exported = load_file(str(next((out / "transformer").glob("*.safetensors"))))
    expected = dict(zip(a.names, shadow))
    assert set(expected) <= set(exported)
    gap = max((exported[n].float() - expected[n]).abs().max().item() for n in expected)
    assert gap < 1e-6, gap
    moved = max((w - s).abs().max().item() for w, s in zip(a.weights[-1], shadow))
    assert moved > 2e-5  # the raw weights are measurably not the EMA (50x the tolerance above)



def test_lora_scaling_alpha_over_rank_holds_in_every_exported_file(tmp_path, monkeypatch):
    """SD LoRA with alpha 8 != rank 4 (scale 2): stock diffusers' `load_lora_weights` of the diffusers-format file,
    and of the kohya file, and the merged export where one is written, each give the trained model's own output.
    Mutations: the file's metadata alpha = rank (stock loading applies half the update), the kohya `.alpha` = rank,
    alpha ignored when merging."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    import sadm_finetune.train.entry as training
    from sadm_finetune.tuners.kohya import KOHYA_WEIGHT_NAME
    from tiny_sd import build_captioned_folder, build_tiny_sd_pipeline

    base = build_tiny_sd_pipeline(tmp_path / "base")
    data = build_captioned_folder(tmp_path / "data")
    out = tmp_path / "out"
    runs, real = [], training.train_loop
    monkeypatch.setattr(training, "train_loop", lambda run, *rest: runs.append(run) or real(run, *rest))
    proc = train_in_process(tiny_run_args(base, data, out, steps=1) + [
        "--trainable", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
        "--lora_export_format", "both", "--structure_weight", "0", "--no_use_ema", "--report_to", "none"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = runs[0].unwrapped_denoiser.eval()
    assert {m.scaling["default"] for m in trained.modules() if hasattr(m, "scaling")} == {2.0}  # alpha / r

    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 600]), torch.randn(2, 16, 32, generator=g))

    def output(unet):
        with torch.no_grad():
            return unet.eval()(*inputs).sample

    expected = output(trained)
    change = (expected - output(StableDiffusionPipeline.from_pretrained(base).unet)).abs().max().item()
    assert change > 1e-3, change  # the LoRA's update is far above the tolerance below: half of it would show
    seen = {}
    for weight_name in ("pytorch_lora_weights.safetensors", KOHYA_WEIGHT_NAME):
        pipe = StableDiffusionPipeline.from_pretrained(base)
        pipe.load_lora_weights(out, weight_name=weight_name)
        seen[weight_name] = output(pipe.unet)
    if (out / "model_index.json").is_file():  # the merged pipeline, where the run writes one
        seen["merged export"] = output(DiffusionPipeline.from_pretrained(out).unet)
    for name, got in seen.items():
        gap = (got - expected).abs().max().item()
        assert gap < 2e-5 * max(1.0, change), (name, gap, change)
