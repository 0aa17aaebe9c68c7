"""The README's main command: the demo recipe on the bundled base and builtin digits, shortened."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_demo_recipe_runs_offline_and_exports(demo_run):
    out, proc = demo_run  # conftest.py: accelerate launch train_sadm.py --config configs/demo.yaml ...
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scikit-learn digits" in proc.stdout
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DiTPipeline"
    assert (out / "samples" / "final.png").is_file() and (out / "structure_discriminator").is_dir()
    assert "demo-dit-digits" in (out / "README.md").read_text()
