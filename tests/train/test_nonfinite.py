"""Non-finite losses or gradients: the update is skipped (G and D), counted, and the run stops after
--max_nonfinite_steps in a row with the last good checkpoint intact."""

import pytest
from safetensors.torch import load_file, save_file

from launch import tiny_run_args, train_in_process
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

pytestmark = pytest.mark.slow


def test_nonfinite_updates_are_skipped_then_the_run_stops(tmp_path):
    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    weights_file = next((base / "transformer").glob("*.safetensors"))
    weights = load_file(str(weights_file))
    key = next(k for k in weights if k.startswith("proj_out_2") and k.endswith("weight"))
    weights[key][0, 0] = float("nan")  # the model output is NaN from the first step on
    save_file(weights, str(weights_file))
    data = build_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=50) + ["--max_nonfinite_steps", "3", "--report_to", "none"]
    proc = train_in_process(args)
    assert proc.returncode == 2, proc.stderr[-3000:]  # sadm-train's exit status for a user-facing error
    line = [ln for ln in proc.stderr.splitlines() if "sadm-train: error:" in ln]
    assert len(line) == 1 and "Traceback" not in proc.stderr
    assert "max_nonfinite_steps: 3 updates in a row" in line[0] and "step 3" in line[0]
    assert not (out / "model_index.json").exists()


def test_a_skipped_discriminator_update_is_counted_as_the_discriminators(tmp_path, monkeypatch):
    """D's loss is NaN on every step: D's update is skipped and counted under its own key, the denoiser (and EMA)
    still step with nonfinite_updates 0, a term after SADM still runs its phase, and max_nonfinite_steps still
    stops the run, naming D's count."""
    import torch
    from accelerate import Accelerator

    from sadm_finetune.train import builders
    from sadm_finetune.terms.sadm.objective import SADMObjective
    from sadm_finetune.terms import Term

    real_disc_loss = SADMObjective.discriminator_loss

    def nan_disc_loss(self, *args, **kwargs):
        loss, logs = real_disc_loss(self, *args, **kwargs)
        return loss * float("nan"), logs

    phases = []

    class Later(Term):  # a term after SADM, with a phase of its own
        name = "later"

        def weight(self, step):
            return 0.0

        def phase(self, ctx, update):
            phases.append(ctx.step)
            return {}, None

    real_build_terms = builders.build_terms
    logged = []
    monkeypatch.setattr(SADMObjective, "discriminator_loss", nan_disc_loss)
    monkeypatch.setattr(builders, "build_terms", lambda *a: [*real_build_terms(*a), Later()])
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None: logged.append(values))

    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data")
    args = tiny_run_args(base, data, tmp_path / "out", steps=50) + ["--max_nonfinite_steps", "3", "--use_ema"]
    proc = train_in_process(args)
    line = [ln for ln in proc.stderr.splitlines() if "sadm-train: error:" in ln]
    assert proc.returncode == 2 and len(line) == 1, proc.stderr[-3000:]
    assert "max_nonfinite_steps: 3 updates in a row" in line[0] and "step 3;" in line[0]
    assert "nonfinite_updates 0, nonfinite_discriminator_updates 3" in line[0]
    assert [logs["nonfinite_updates"] for logs in logged] == [0.0, 0.0, 0.0]  # the denoiser stepped every time
    assert [logs["nonfinite_discriminator_updates"] for logs in logged] == [1.0, 2.0, 3.0]
    assert all(torch.isfinite(torch.tensor(logs["loss_diffusion"])) for logs in logged)
    assert phases == [0, 1, 2]  # the later term's phase ran after each (applied) denoiser update
