"""Third-party lines every run used to print are gone from stderr; the filters drop only those lines."""

from __future__ import annotations

import logging
import re

import pytest

from sadm_finetune.utils.quiet import DROPPED, DropMessages

NOISE = [
    "requires torchvision (not installed)",  # transformers, on import
    "Expected types for id2label",  # diffusers, on every DiT pipeline load
    "should be kept in float32: []",  # diffusers, on model.to(dtype) with nothing to keep
]


@pytest.mark.slow
def test_a_demo_run_prints_no_known_third_party_noise(demo_run):
    _, proc = demo_run  # conftest.py: the README's command in fresh processes, so import-time lines count too
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in NOISE:
        assert line not in proc.stderr, proc.stderr[-3000:]
    assert "Saved the fine-tuned pipeline" in proc.stdout and "SADM: lambda" in proc.stdout  # our own output stays
    # D's share of the denoiser is a fact of the run summary, never a warning about the toolkit's own defaults,
    # and a single-process run prints no "[RANK 0]" prefix; the launcher's notice about unset options is gone too.
    assert re.search(r"SADM: lambda .*, discriminator [\d.]+ M parameters \([\d.]+% of the denoiser", proc.stdout)
    assert "structure discriminator has" not in proc.stderr
    assert "[RANK 0]" not in proc.stdout + proc.stderr
    assert "were not passed to `accelerate launch`" not in proc.stderr


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
