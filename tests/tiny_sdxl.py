"""A tiny random-init StableDiffusionXLPipeline built in code (no network), after diffusers' own SDXL pipeline
tests (`StableDiffusionXLPipelineFastTests.get_dummy_components`), with tiny_sd's offline tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_sd import _byte_level_vocab

TIME_EMBED_DIM = 8  # addition_time_embed_dim: each of the 6 add_time_ids is embedded to this many channels
POOLED_DIM = 32  # text_encoder_2's projection_dim


def build_tiny_sdxl_pipeline(path: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """32x32x3 images <-> 8x8x4 latents; a (32, 64)-channel UNet with SDXL's text_time embedding; two 2-layer
    CLIP text encoders (16 tokens, width 32 each; the second with a 32-d pooled projection)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM,
    )
    vae = _tiny_vae()
    vocab = _byte_level_vocab()
    text_config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=POOLED_DIM,
    )
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def _tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], latent_channels=latent_channels,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )


def build_tiny_vae(path: str | Path, seed: int = 1, latent_channels: int = 4) -> Path:
    """A second VAE for the tiny SDXL (its architecture, other random weights), saved alone: what
    --pretrained_vae_model_name_or_path takes (e.g. the fp16-fix SDXL VAE)."""
    torch.manual_seed(seed)
    _tiny_vae(latent_channels).save_pretrained(path, safe_serialization=True)
    return Path(path)
