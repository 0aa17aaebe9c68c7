"""The README's main command: the demo recipe on the bundled base and builtin digits, shortened."""

import json

import pytest

from launch import accelerate_launch, offline_env

pytestmark = pytest.mark.slow


def test_demo_recipe_runs_offline_and_exports(tmp_path):
    out = tmp_path / "demo"
    args = ["--config", "configs/demo.yaml", "--output_dir", str(out), "--max_train_steps", "3",
            "--structure_warmup_steps", "0", "--validation_inference_steps", "2", "--num_validation_images", "1",
            "--report_to", "none"]
    proc = accelerate_launch(args, offline_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scikit-learn digits" in proc.stdout
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DiTPipeline"
    assert (out / "samples" / "final.png").is_file() and (out / "structure_discriminator").is_dir()
    assert "demo-dit-digits" in (out / "README.md").read_text()
