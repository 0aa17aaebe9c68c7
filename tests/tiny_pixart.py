"""A tiny random-init PixArtSigmaPipeline built in code (no network), after diffusers' own PixArt-Σ pipeline tests
(`PixArtSigmaPipelineFastTests.get_dummy_components`), with an offline character-level T5 tokenizer."""

from __future__ import annotations

import string
from pathlib import Path

import torch

TEXT_DIM = 32  # the T5 encoder's d_model = the transformer's caption_channels


def build_t5_tokenizer(model_max_length: int = 300):
    """A T5 tokenizer (sentencepiece-style Unigram: `<pad>` 0, `</s>` 1, `<unk>` 2) over single characters, each
    alone and after the word-start mark `▁`: every lower-case caption tokenizes, offline."""
    from transformers import T5Tokenizer

    symbols = list(string.ascii_lowercase + string.digits + "-.,'!?")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(s, -3.0) for s in symbols] + [("▁" + s, -2.5) for s in symbols]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def build_tiny_pixart_pipeline(path: str | Path, seed: int = 0, use_additional_conditions: bool | None = None,
                               learned_sigma: bool = True) -> Path:
    """A 2-layer PixArtTransformer2DModel (width 32, or 24 with `use_additional_conditions`; patch 2, learned sigma: 8 output channels) over a 4-block VAE
    (factor 8, as the real one) and a 2-layer T5 encoder (width 32). sample_size 32 (256 px): the smallest size
    the stock pipeline's resolution binning accepts, so a plain `pipe(prompt)` samples (at 256 px); training runs
    at --resolution 32 (4x4 latents)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    heads = 3 if use_additional_conditions else 4  # size embeddings split the width in 3: (h, w) and h / w
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=heads,
        caption_channels=TEXT_DIM, in_channels=4, cross_attention_dim=8 * heads, out_channels=8 if learned_sigma else 4,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=use_additional_conditions,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16], latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )
    tokenizer = build_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))
    # PixArt-Σ's scheduler (DPM-Solver++ multistep); training reads its betas and prediction type (epsilon).
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon")
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
