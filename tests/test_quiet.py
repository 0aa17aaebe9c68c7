"""Third-party lines every run used to print are gone from stderr; the filters drop only those lines."""

from __future__ import annotations

import logging
import subprocess
import sys

from launch import ROOT, offline_env

from sadm_finetune.quiet import DROPPED, DropMessages

NOISE = [
    "requires torchvision (not installed)",  # transformers, on import
    "Expected types for id2label",  # diffusers, on every DiT pipeline load
    "should be kept in float32: []",  # diffusers, on model.to(dtype) with nothing to keep
]


def test_a_demo_run_prints_no_known_third_party_noise(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_sadm.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
         "--output_dir", str(out), "--max_train_steps", "2", "--report_to", "none"],
        env=offline_env(tmp_path, OMP_NUM_THREADS="1"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in NOISE:
        assert line not in proc.stderr, proc.stderr[-3000:]
    assert "Saved the fine-tuned pipeline" in proc.stdout and "SADM: lambda" in proc.stdout  # our own output stays


def _passes(logger_name: str, message: str) -> bool:
    record = logging.LogRecord(logger_name, logging.WARNING, __file__, 0, message, None, None)
    return all(f.filter(record) for f in [DropMessages(DROPPED[logger_name])])


def test_filters_are_narrow():
    assert not _passes("diffusers.pipelines.pipeline_utils",
                       "Expected types for id2label: (dict[int, str], <class 'NoneType'>), got typing.Dict[str, str].")
    assert _passes("diffusers.pipelines.pipeline_utils",
                   "Expected types for transformer: (DiTTransformer2DModel,), got UNet2DModel.")
    assert not _passes("diffusers.models.modeling_utils",
                       "There are modules in AutoencoderKL that should be kept in float32: []. Casting directly")
    assert _passes("diffusers.models.modeling_utils",
                   "There are modules in T5EncoderModel that should be kept in float32: ['wo']. Casting directly")
    assert not _passes("transformers.utils.import_utils",
                       "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
    assert _passes("transformers.utils.import_utils", "Could not import module 'CLIPModel'.")
