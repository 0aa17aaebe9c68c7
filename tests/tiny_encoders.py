"""Test helpers shared by several test files (moved from tests/terms/repa/test_repa.py so that each file runs alone)."""

import json

import torch


TINY_ENCODER = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=7,
                    image_size=28)


def build_tiny_encoder(path, registers: int = 0, seed: int = 0, mean=None, std=None):
    """A random DINOv2 (with `registers` register tokens) saved with save_pretrained; a preprocessor config if
    mean/std are given."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **TINY_ENCODER))
    else:
        model = Dinov2Model(Dinov2Config(**TINY_ENCODER))
    model.save_pretrained(path, safe_serialization=True)
    if mean is not None:
        (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    return path


def repa_args(encoder, depth=1, resolution=42):
    return ["--repa_weight", "0.5", "--repa_encoder", str(encoder), "--repa_depth", str(depth),
            "--repa_projector_dim", "16", "--repa_encoder_resolution", str(resolution)]
