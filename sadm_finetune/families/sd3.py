"""Stable Diffusion 3 / 3.5 family: an MMDiT (`SD3Transformer2DModel`) trained with flow matching, three text
encoders (CLIP-L, CLIP-G, optional T5-XXL) and pooled text embeddings.

What differs from SD 1.x / 2.x (both are `text.TextFamilyAdapter`s, whose caption dropout, data checks, validation
prompts, text cache and sampling this reuses):
- the noise process is rectified flow (`noise.FlowMatchProcess`, chosen from the FlowMatchEulerDiscreteScheduler
  config): it declares "flow_matching", not "ddpm", so options of the DDPM loss (--snr_gamma) are refused before any
  weights load;
- text: `encode_text` computes what `StableDiffusion3Pipeline.encode_prompt` does: both CLIPs' penultimate
  hidden states concatenated and zero-padded to T5's width, then T5's tokens (zeros when the pipeline has no
  `text_encoder_3`, as the pipeline itself does), and both CLIPs' pooled projections concatenated;
- the denoiser is a transformer: its blocks return (text tokens, image tokens), the terms read the image tokens;
- the LoRA file is SD3's (`transformer.` peft keys, `FamilyAdapter.save_lora_weights`), which
  `StableDiffusion3Pipeline.load_lora_weights` reads.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from torch import nn
from torch.nn import functional as F

from ..utils.errors import ConfigError
from .base import ModelOutput
from .text import TextFamilyAdapter


class StableDiffusion3Adapter(TextFamilyAdapter):
    family = "stable-diffusion-3"
    display_name = "Stable Diffusion 3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    pipeline_class = StableDiffusion3Pipeline
    denoiser_name = "transformer"
    # diffusers' SD3 LoRA script: the image and the text stream's attention projections (add_* where present).
    lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out")
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    # No kohya file (its key format is for SD/SDXL UNets), no DiffFit (MMDiT blocks are no BasicTransformerBlocks).
    capabilities = frozenset({"text", "flow_matching", "aspect_ratio_buckets", "stock_lora_loader",
                              "block_hidden_states"})
    capability_gaps = {"pos_embed_transfer": "SD3's transformer crops its own positional embedding to the image size",
                       "class_label_blocks": "SD3's MMDiT is text-conditioned (joint text and image blocks)"}
    vae_fp32_under_bf16 = True  # train_dreambooth_lora_sd3.py keeps the VAE in fp32 under any mixed precision
    hidden_output_index = 1  # JointTransformerBlock returns (encoder_hidden_states, hidden_states)
    max_sequence_length = 256  # T5 tokens: the pipeline's __call__ default, so training sees what sampling sees

    def check_resolution(self, resolution: int) -> None:
        super().check_resolution(resolution)
        m = self.patch_multiple
        max_size = self.denoiser.config.pos_embed_max_size
        if max_size is not None and resolution // m > max_size:
            raise ConfigError("resolution", f"{resolution} needs {resolution // m} patches per side, more than the "
                              f"transformer's positional embedding covers ({max_size})",
                              f"use at most {max_size * m}")

    def aspect_ratio_bucket_multiple(self) -> int:
        return self.patch_multiple  # the pipeline's own rule: height and width divisible by vae factor x patch

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Prompts -> {"prompt_embeds": (B, 77 + 256, joint_attention_dim), "pooled_prompt_embeds": (B, 2 x proj)},
        `StableDiffusion3Pipeline.encode_prompt` with one prompt for all three encoders and no clip_skip."""
        p = self.pipeline
        clip_hidden, pooled = [], []
        for encoder, tokenizer in ((p.text_encoder, p.tokenizer), (p.text_encoder_2, p.tokenizer_2)):
            input_ids = tokenizer(prompts, padding="max_length", max_length=p.tokenizer_max_length,
                                  truncation=True, return_tensors="pt").input_ids
            out = encoder(input_ids.to(device), output_hidden_states=True)
            pooled.append(out[0])  # CLIPTextModelWithProjection's text_embeds
            clip_hidden.append(out.hidden_states[-2].to(p.text_encoder.dtype))
        t5 = self._t5_embeds(prompts, device)
        clip = torch.cat(clip_hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def _t5_embeds(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        p = self.pipeline
        if p.text_encoder_3 is None:  # the pipeline's own stand-in for a dropped T5
            return torch.zeros(len(prompts), self.max_sequence_length, self.denoiser.config.joint_attention_dim,
                               device=device, dtype=p.text_encoder.dtype)
        input_ids = p.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        return p.text_encoder_3(input_ids.to(device))[0].to(p.text_encoder_3.dtype)

    def conditioning(self, batch: dict[str, Any], device: torch.device, weight_dtype: torch.dtype,
                     drop: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        # Caption dropout replaces both the token and the pooled embeddings by the empty prompt's, together.
        embeds = self.dropped_text_embeddings(batch, device, drop, generator)
        return {"encoder_hidden_states": embeds["prompt_embeds"], "pooled_projections": embeds["pooled_prompt_embeds"]}

    def predict(self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> ModelOutput:
        out = denoiser(hidden_states=noisy_latents, timestep=timesteps,
                       encoder_hidden_states=conditioning["encoder_hidden_states"],
                       pooled_projections=conditioning["pooled_projections"], return_dict=False)[0]
        return ModelOutput(out)  # the velocity eps - x0

    def feature_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        return list(denoiser.transformer_blocks)  # outputs read: the image tokens, (B, h*w/p^2, inner_dim)

    def export_pipeline(self, denoiser: nn.Module) -> DiffusionPipeline:
        # Components the base holds (T5 or not, an image encoder for IP-Adapter) travel unchanged.
        return StableDiffusion3Pipeline(**{**self.pipeline.components, "vae": self.vae, "transformer": denoiser})

    def card_tags(self) -> list[str]:
        return [self.family, "sd3", "sd3-diffusers", "text-to-image"]  # the tags of diffusers' SD3 scripts
