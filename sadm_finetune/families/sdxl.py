"""Stable Diffusion XL family: the SD UNet recipe with two CLIP text encoders, pooled text embeddings and
micro-conditioning.

What differs from SD 1.x / 2.x (`sd.StableDiffusionAdapter`, whose caption dropout, checks, feature blocks,
sampling and LoRA file this reuses):
- text: the penultimate hidden states of both encoders, concatenated, and the second encoder's pooled
  projection (`encode_text`, as `StableDiffusionXLPipeline.encode_prompt` computes them);
- micro-conditioning: `add_time_ids` = (original size, crop top-left, target size) of each sample, read from
  the batch's geometry (`data.GEOMETRY_KEYS`), in the order of the pipeline's `_get_add_time_ids`;
- guidance negatives: with `force_zeros_for_empty_prompt` (SDXL base) the pipeline samples against zeros, not
  the empty prompt's embeddings. Training dropout still uses the encoded empty prompt, as diffusers'
  train_text_to_image_sdxl.py does (`proportion_empty_prompts`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from torch import nn

from .base import ModelOutput
from .sd import StableDiffusionAdapter


def add_time_ids(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """(B, 6) SDXL micro-conditioning per sample: original (h, w), crop top-left (y, x), target (h, w).

    fp32 whatever the weight dtype: bf16 holds integers above 256 only approximately (1365 -> 1368), and the
    UNet embeds the values in fp32 anyway (`get_timestep_embedding`)."""
    parts = [batch[key] for key in ("original_sizes", "crop_top_lefts", "target_sizes")]  # (B, 2) int64 each
    return torch.cat(parts, dim=1).to(device=device, dtype=torch.float32)


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    family = "stable-diffusion-xl"
    display_name = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    pipeline_class = StableDiffusionXLPipeline
    load_kwargs: dict[str, Any] = {}  # no safety checker to skip
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    kohya_text_encoder_prefixes = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}  # sd-scripts' names
    vae_fp32_under_bf16 = True  # train_text_to_image_lora_sdxl.py: "The VAE is in float32 to avoid NaN losses"

    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Prompts -> {"prompt_embeds": (B, tokens, dim_1 + dim_2), "pooled_prompt_embeds": (B, proj_dim)} (with grad
        into both encoders' LoRA with --train_text_encoder: `text_grad`)."""
        hidden = []
        for name, tokenizer_name in zip(self.text_encoder_names, self.tokenizer_names):
            tokenizer, encoder = getattr(self.pipeline, tokenizer_name), self.text_encoder_module(name)
            input_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
            with self.text_grad():
                out = encoder(input_ids.to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL reads the penultimate layer of both encoders
        # The pooled embedding is the last encoder's (CLIPTextModelWithProjection's text_embeds).
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": out.text_embeds}

    def text_encoder_lora_exclude(self, name: str, encoder: nn.Module) -> list[str]:
        """The first encoder's last layer: SDXL reads its penultimate hidden states only (the second encoder's last
        layer feeds the pooled projection and keeps its LoRA)."""
        if name != "text_encoder":
            return []
        from ..tuners.lora import TEXT_ENCODER_TARGETS

        last = encoder.config.num_hidden_layers - 1
        return [f"layers.{last}.self_attn.{target}" for target in TEXT_ENCODER_TARGETS]

    def cached_text_inputs(self, prompt: str, num_images: int, device: torch.device) -> dict[str, torch.Tensor]:
        inputs = super().cached_text_inputs(prompt, num_images, device)
        if self.pipeline.config.force_zeros_for_empty_prompt:  # what the pipeline itself does without a negative
            for name in ("prompt_embeds", "pooled_prompt_embeds"):
                inputs[f"negative_{name}"] = torch.zeros_like(inputs[name])
        return inputs

    def conditioning(self, batch: dict[str, Any], device: torch.device, weight_dtype: torch.dtype,
                     drop: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        embeds = self.dropped_text_embeddings(batch, device, drop, generator)
        return {"encoder_hidden_states": embeds["prompt_embeds"], "text_embeds": embeds["pooled_prompt_embeds"],
                "time_ids": add_time_ids(batch, device)}

    def predict(self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> ModelOutput:
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        out = denoiser(noisy_latents, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"],
                       added_cond_kwargs=added).sample
        return ModelOutput(out)

    def export_pipeline(self, denoiser: nn.Module) -> DiffusionPipeline:
        # The base's other components (an image encoder for IP-Adapter, if it has one) travel unchanged.
        components = {**self.pipeline.components, "vae": self.vae, "unet": denoiser}
        return StableDiffusionXLPipeline(
            **components, force_zeros_for_empty_prompt=self.pipeline.config.force_zeros_for_empty_prompt)

    def kohya_labels(self) -> dict[str, str]:
        """kohya's labels for an SDXL LoRA (sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, sai_model_spec's
        ARCH_SD_XL_V1_BASE): A1111 / Forge list a LoRA as SDXL by `ss_base_model_version` starting with `sdxl_`."""
        v_pred = self.pipeline.scheduler.config.get("prediction_type") == "v_prediction"
        return {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                "modelspec.prediction_type": "v" if v_pred else "epsilon"}

    def card_tags(self) -> list[str]:
        return [*super().card_tags(), "stable-diffusion-xl-diffusers"]  # the tags of diffusers' SDXL scripts
