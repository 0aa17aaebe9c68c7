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
