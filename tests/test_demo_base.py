"""The bundled demo base pipeline (sadm_finetune/assets/demo-dit-digits) loads with stock diffusers.

It is made by scripts/make_demo_base.py; this test only reads it, offline.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch

import sadm_finetune

DEMO_BASE = Path(sadm_finetune.__file__).resolve().parent / "assets" / "demo-dit-digits"


@pytest.fixture(scope="module")
def pipe():
    if not (DEMO_BASE / "model_index.json").is_file():
        pytest.fail(f"bundled demo base pipeline missing at {DEMO_BASE}; run scripts/make_demo_base.py")
    from diffusers import DiffusionPipeline

    p = DiffusionPipeline.from_pretrained(str(DEMO_BASE))
    p.set_progress_bar_config(disable=True)
    return p


def test_folder_layout_is_safetensors_only():
    for sub in ("transformer", "vae"):
        files = {f.name for f in (DEMO_BASE / sub).iterdir()}
        assert "config.json" in files
        assert "diffusion_pytorch_model.safetensors" in files
        assert not any(name.endswith((".bin", ".pt", ".ckpt")) for name in files)
    assert (DEMO_BASE / "scheduler" / "scheduler_config.json").is_file()
    total = sum(f.stat().st_size for f in DEMO_BASE.rglob("*") if f.is_file())
    assert total < 12 * 1024 * 1024


def test_is_dit_pipeline_with_learned_sigma(pipe):
    from diffusers import DDIMScheduler, DiTPipeline

    assert isinstance(pipe, DiTPipeline)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    latent_channels = pipe.vae.config.latent_channels
    assert pipe.transformer.config.in_channels == latent_channels
    assert pipe.transformer.config.out_channels == 2 * latent_channels
    # DiTPipeline uses class id 1000 as the null label for classifier-free guidance
    assert pipe.transformer.config.num_embeds_ada_norm == 1000
    assert pipe.vae.config.scaling_factor != 1.0
    assert np.isfinite(pipe.vae.config.scaling_factor) and pipe.vae.config.scaling_factor > 0


def test_id2label_covers_ten_digits(pipe):
    # DiTPipeline builds `labels` from model_index.json's id2label at load time (the reloaded
    # pipe.config does not keep id2label: re-register it before re-saving a DiTPipeline).
    assert pipe.labels == {str(i): i for i in range(10)}
    assert pipe.get_label_ids(["3", "7"]) == [3, 7]
    index = json.loads((DEMO_BASE / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline"
    assert {int(k): v for k, v in index["id2label"].items()} == {i: str(i) for i in range(10)}


def test_sampling_gives_finite_images(pipe):
    out = pipe(
        class_labels=[1, 7],
        num_inference_steps=2,
        guidance_scale=1.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (2, 32, 32, 3)
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
