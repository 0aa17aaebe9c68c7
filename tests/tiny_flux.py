"""A tiny random-init FluxPipeline built in code (no network), after diffusers' own Flux pipeline tests
(`FluxPipelineFastTests.get_dummy_components`), with tiny_sd's offline CLIP tokenizer and tiny_sd3's offline T5 one.

Flux.1-dev's traits are on: the VAE's `shift_factor`, the scheduler's dynamic shift (Flux.1-dev's scheduler config),
the guidance embedding (`guidance=False`: schnell's transformer, without one), dual- and single-stream blocks."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_sd import _byte_level_vocab
from tiny_sd3 import tiny_shifted_vae, tiny_t5_tokenizer

SHIFT_FACTOR, SCALING_FACTOR = 0.1159, 0.3611  # Flux.1's VAE values
# Flux.1-dev's scheduler/scheduler_config.json
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                 use_dynamic_shifting=True)


def build_tiny_flux_pipeline(path: str | Path, seed: int = 0, guidance: bool = True) -> Path:
    """32x32x3 images <-> 8x8x4 latents (packed 2x2: 4x4 tokens of 16 channels); a transformer with one dual- and
    one single-stream block (width 32, rotary axes 4+4+8); a 2-layer CLIP text encoder (16 tokens, width 32 =
    pooled_projection_dim); a 2-layer T5 encoder of width 32 (= joint_attention_dim)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=(4, 4, 8),
    )
    vae = tiny_shifted_vae(SHIFT_FACTOR, SCALING_FACTOR)
    vocab = _byte_level_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
