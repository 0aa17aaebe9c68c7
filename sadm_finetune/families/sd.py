"""Stable Diffusion family (1.x / 2.x): `UNet2DConditionModel` + CLIP text encoder + tokenizer, text-conditioned.

What is the UNet's (and so SDXL's too, `sdxl.py`): the resolution and bucket rules, the feature blocks, the kohya LoRA
file. The text side (captions or their cached embeddings, --cache_text_embeddings, caption dropout to the empty
prompt for classifier-free guidance, validation prompts) is every text family's, `text.TextFamilyAdapter`; this adapter
only encodes a prompt into CLIP's hidden states, `encoder_hidden_states`. Epsilon and v-prediction come from the
scheduler config, as for every family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from torch import nn

from ..utils.errors import ConfigError
from .base import ModelOutput
from .text import TextFamilyAdapter


class StableDiffusionAdapter(TextFamilyAdapter):
    family = "stable-diffusion"
    display_name = "Stable Diffusion"
    pipeline_classes = ("StableDiffusionPipeline",)
    pipeline_class: type[DiffusionPipeline] = StableDiffusionPipeline  # exported; its LoRA loader reads our file
    denoiser_name = "unet"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention projections
    # The safety checker (1.2 GB) plays no part in training, and the export is saved without it.
    load_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    capabilities = frozenset({"text", "ddpm", "aspect_ratio_buckets", "difffit", "kohya_lora", "stock_lora_loader",
                              "block_hidden_states"})
    capability_gaps = {"pos_embed_transfer": "{name}'s UNet has no positional embedding to transfer",
                       "class_label_blocks": "{name} has a UNet"}

    @property
    def text_encoder(self) -> nn.Module | None:
        """None once released after --cache_text_embeddings."""
        return self.pipeline.text_encoder

    @property
    def tokenizer(self) -> Any:
        return self.pipeline.tokenizer

    def check_resolution(self, resolution: int) -> None:
        # StableDiffusionPipeline's own rule: the UNet forwards upsample sizes, so any whole latent size works.
        if resolution % self.vae_scale_factor:
            raise ConfigError("resolution", f"{resolution} is not divisible by the VAE factor {self.vae_scale_factor}",
                              f"use a multiple of {self.vae_scale_factor}, e.g. {self.default_resolution()}")

    def aspect_ratio_bucket_multiple(self) -> int:
        # The UNet halves the latent once per down block after the first: sides that divide evenly (64 pixels for
        # SD 1.x / 2.x) never take the odd-size upsampling path.
        return self.vae_scale_factor * 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Prompts -> {"prompt_embeds": (B, tokens, dim)} CLIP hidden states, as StableDiffusionPipeline computes
        them."""
        input_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids
        return {"prompt_embeds": self.text_encoder(input_ids.to(device))[0]}

    def conditioning(self, batch: dict[str, Any], device: torch.device, weight_dtype: torch.dtype,
                     drop: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        # The batch's geometry (original size, crop) plays no part: SD 1.x / 2.x has no micro-conditioning.
        embeds = self.dropped_text_embeddings(batch, device, drop, generator)
        return {"encoder_hidden_states": embeds["prompt_embeds"]}

    def predict(self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> ModelOutput:
        out = denoiser(noisy_latents, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"]).sample
        return ModelOutput(out)

    def feature_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        # The UNet's stages in depth order; outputs are (B, C, h, w) feature maps.
        return [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]

    def export_pipeline(self, denoiser: nn.Module) -> DiffusionPipeline:
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=denoiser,
            scheduler=self.pipeline.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_lora_weights(self, output_dir: Path, lora_state_dict: dict[str, torch.Tensor],
                          adapter_metadata: dict[str, Any], kohya_metadata: dict[str, str] | None = None
                          ) -> dict[str, str]:
        """The stock LoRA file (`FamilyAdapter.save_lora_weights`: peft keys under the `unet.` prefix, which the
        pipeline's `load_lora_weights` reads whole) and/or the kohya file (models/kohya.py), as `lora_formats` says.

        Not diffusers' `convert_state_dict_to_diffusers`: it renames only the modules its table knows (`to_q.lora_A`
        -> `to_q.lora.down`, not `proj_in`), and a file that mixes the two key styles loses one of them in
        `load_lora_adapter`, which picks the style from the first key."""
        formats = self.lora_formats(self.config)
        written = super().save_lora_weights(output_dir, lora_state_dict, adapter_metadata) if "diffusers" in formats \
            else {}
        if "kohya" in formats:
            from ..tuners.kohya import save_kohya_lora

            labels = {**self.kohya_labels(), **(kohya_metadata or {})}
            written["kohya"] = save_kohya_lora(output_dir, lora_state_dict, adapter_metadata, labels).name
        return written

    def kohya_labels(self) -> dict[str, str]:
        """What kohya's sd-scripts record about the base in a LoRA file (train_network.py, library/sai_model_spec.py),
        which A1111 / Forge read to file the LoRA under its model version: SD 2.x when the UNet cross-attends to
        1024-wide text states (OpenCLIP ViT-H), else SD 1.x; v-prediction from the scheduler."""
        v2 = self.denoiser.config.cross_attention_dim == 1024
        v_pred = self.pipeline.scheduler.config.get("prediction_type") == "v_prediction"
        version = ("sd_v2" if v2 else "sd_v1") + ("_v" if v_pred else "")
        architecture = ("stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512") if v2 \
            else "stable-diffusion-v1"
        return {"ss_base_model_version": version, "ss_v2": str(v2), "modelspec.architecture": f"{architecture}/lora",
                "modelspec.prediction_type": "v" if v_pred else "epsilon"}
