"""A tiny random-init StableDiffusion3Pipeline built in code (no network), after diffusers' own SD3 pipeline tests
(`StableDiffusion3PipelineFastTests.get_dummy_components`), with tiny_sd's offline CLIP tokenizer.

With a tiny T5 encoder and an offline T5 tokenizer (a Unigram vocabulary of printable ASCII), or without T5
(`with_t5=False`: `text_encoder_3` / `tokenizer_3` None, which the pipeline allows, standing zeros in for T5's
tokens). SD3.5 traits are on: the VAE's `shift_factor`, the scheduler's `shift`, RMS qk-norm and a dual-attention block."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_sd import _byte_level_vocab

CLIP_WIDTH = 32  # hidden size and projection dim of each CLIP: pooled = 2 x 32, tokens = 32 + 32 wide
SHIFT_FACTOR, SCALING_FACTOR, SHIFT = 0.0609, 1.5305, 3.0  # SD3's VAE and SD3.5's scheduler values



def tiny_shifted_vae(shift_factor: float, scaling_factor: float):
    """The tiny 3-block AutoencoderKL of SD3 and Flux (32x32x3 <-> 4x8x8): no quant convs, a latent
    shift and scale as the real VAE's config carries them."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    )

def tiny_t5_tokenizer():
    """A T5 tokenizer built offline: pad, eos, unk, the printable ASCII characters and the word marker."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *[(chr(c), -1.0) for c in range(32, 127)], ("\u2581", -1.0)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def build_tiny_sd3_pipeline(path: str | Path, seed: int = 0, with_t5: bool = True) -> Path:
    """32x32x3 images <-> 8x8x4 latents (patch 2: 4x4 tokens); a 2-block MMDiT (width 32); two 2-layer CLIP text
    encoders with projections (16 tokens); a 2-layer T5 encoder of width 64 (= joint_attention_dim, the width
    the CLIP tokens are zero-padded to); FlowMatchEulerDiscreteScheduler(shift=3)."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=2 * CLIP_WIDTH, caption_projection_dim=32,
        pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,),
    )
    vae = tiny_shifted_vae(SHIFT_FACTOR, SCALING_FACTOR)
    vocab = _byte_level_vocab()
    text_config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=CLIP_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=CLIP_WIDTH,
    )
    text_encoder = CLIPTextModelWithProjection(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        tokenizer_3 = tiny_t5_tokenizer()
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=2 * CLIP_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
