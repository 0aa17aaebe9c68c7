"""Tiny pipelines and data built in code, saved with save_pretrained: tests take the user's loading path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def build_tiny_dit_pipeline(path: str | Path, learned_sigma: bool = True, num_classes: int = 10,
                            prediction_type: str = "epsilon", seed: int = 0, num_layers: int = 1) -> Path:
    """A random-init DiTPipeline: 32x32x3 images <-> 8x8x4 latents, a 1-layer DiT (by default); ~1 MB on disk."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8 if learned_sigma else 4,
        num_layers=num_layers, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )
    vae.register_to_config(scaling_factor=0.5)
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False, prediction_type=prediction_type)
    id2label = {i: f"class_{i}" for i in range(num_classes)}
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    pipe.register_to_config(id2label=id2label)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def build_image_folder(root: str | Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 4,
                       size: int = 40, seed: int = 0) -> Path:
    """An ImageNet-style folder: one subfolder of PNGs per class."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((size, size, 3)) * 127 + 64 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root
