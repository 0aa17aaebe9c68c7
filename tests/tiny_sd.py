"""A tiny random-init StableDiffusionPipeline and a captioned image folder, built in code (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CAPTIONS = ("a red square", "a blue circle", "a green triangle", "a yellow star")


def _byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol alone and as a word end: 512 tokens + bos/eos."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    return vocab


def build_tiny_sd_pipeline(path: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """32x32x3 images <-> 8x8x4 latents; a (32, 64)-channel UNet, a 2-layer CLIP text encoder (16 tokens)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )
    vocab = _byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def build_captioned_folder(root: str | Path, num_images: int = 8, size: int = 40, seed: int = 0) -> Path:
    """A flat image folder with `metadata.jsonl` (`file_name`, `text`), the `datasets` imagefolder format."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num_images):
        pixels = (rng.random((size, size, 3)) * 127 + 32 * (i % 4)).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[i % len(CAPTIONS)]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


# (h, w) of the images of `build_mixed_aspect_folder`: landscape, portrait and square, for aspect-ratio buckets.
MIXED_SIZES = ((30, 61), (61, 30), (40, 40), (24, 50), (50, 24), (36, 36))


def build_mixed_aspect_folder(root: str | Path, copies: int = 2,
                              seed: int = 0) -> tuple[Path, dict[str, tuple[int, int]]]:
    """A captioned flat folder of `copies` images of each MIXED_SIZES shape; each caption names its image
    (`img-<i>`), so a sample can be traced back to its file. Returns the folder and caption -> (h, w)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines, sizes = [], {}
    for i, (h, w) in enumerate(MIXED_SIZES * copies):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"img-{i}"}))
        sizes[f"img-{i}"] = (h, w)
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root, sizes
