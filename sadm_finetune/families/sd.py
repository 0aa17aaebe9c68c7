"""Stable Diffusion family (1.x / 2.x): `UNet2DConditionModel` + CLIP text encoder + tokenizer, text-conditioned.

What is the UNet's (and so SDXL's too, `sdxl.py`): the resolution and bucket rules, the feature blocks, the kohya LoRA
file. The text side (captions or their cached embeddings, --cache_text_embeddings, caption dropout to the empty
prompt for classifier-free guidance, validation prompts) is every text family's, `text.TextFamilyAdapter`; this adapter
only encodes a prompt into CLIP's hidden states, `encoder_hidden_states`. Epsilon and v-prediction come from the
scheduler config, as for every family.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from torch import nn

from .base import ModelOutput
from .text import TextFamilyAdapter


def clip_lora_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's peft LoRA keys as LoRA files name them: under `text_model.`, which transformers 5's
    CLIPTextModel no longer has as a module (`encoder.layers.0.self_attn.q_proj.lora_A.weight` ->
    `text_model.encoder.layers.0...`); diffusers' loader and kohya's names (`lora_te_text_model_encoder_...`)
    expect it, and the loader drops it again for a flattened encoder."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


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
                              "block_hidden_states", "text_encoder_lora"})
    capability_gaps = {"pos_embed_transfer": "{name}'s UNet has no positional embedding to transfer",
                       "class_label_blocks": "{name} has a UNet"}

    @property
    def text_encoder(self) -> nn.Module | None:
        """None once released after --cache_text_embeddings."""
        return self.pipeline.text_encoder

    @property
    def tokenizer(self) -> Any:
        return self.pipeline.tokenizer

    def aspect_ratio_bucket_multiple(self) -> int:
        # The UNet halves the latent once per down block after the first: sides that divide evenly (64 pixels for
        # SD 1.x / 2.x) never take the odd-size upsampling path.
        return self.vae_scale_factor * 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Prompts -> {"prompt_embeds": (B, tokens, dim)} CLIP hidden states, as StableDiffusionPipeline computes
        them (with grad into the encoder's LoRA with --train_text_encoder: `text_grad`)."""
        input_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids
        with self.text_grad():
            return {"prompt_embeds": self.text_encoder_module("text_encoder")(input_ids.to(device))[0]}

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

    # kohya's sd-scripts (networks/lora.py): LORA_PREFIX_TEXT_ENCODER for one text encoder, _1 / _2 for SDXL's two
    kohya_text_encoder_prefixes = {"text_encoder": "lora_te"}

    def text_encoder_lora_exclude(self, name: str, encoder: nn.Module) -> list[str]:
        """--train_text_encoder: the projections of text encoder `name` that get no LoRA because `encode_text` never
        reads their output (no gradient would reach them, and DDP stops on parameters without one): none for SD's
        last-layer hidden states."""
        return []

    def save_lora_weights(self, output_dir: Path, lora_state_dict: dict[str, torch.Tensor],
                          adapter_metadata: dict[str, Any], kohya_metadata: dict[str, str] | None = None,
                          text_encoder_lora: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None
                          ) -> dict[str, str]:
        """The stock LoRA file and/or the kohya file (models/kohya.py), as `lora_formats` says. `text_encoder_lora`
        (--train_text_encoder): component name -> (its peft LoRA tensors, its LoRA config), written beside the UNet's.

        The diffusers file: the pipeline class's own `save_lora_weights` (keys `unet.<peft key>` and
        `text_encoder[_2].text_model.<peft key>`, each part's LoRA config in the metadata), which its
        `load_lora_weights` reads whole, UNet and text encoders. The text encoders' keys carry CLIP's `text_model.`
        (`clip_lora_keys`) as every SD LoRA file does; diffusers' loader drops it for transformers' flattened CLIP.

        Not diffusers' `convert_state_dict_to_diffusers`: it renames only the modules its table knows (`to_q.lora_A`
        -> `to_q.lora.down`, not `proj_in`), and a file that mixes the two key styles loses one of them in
        `load_lora_adapter`, which picks the style from the first key."""
        formats = self.lora_formats(self.config)
        text = {name: (clip_lora_keys(state), metadata)
                for name, (state, metadata) in (text_encoder_lora or {}).items()}
        written = {}
        if "diffusers" in formats:
            from ..tuners.lora import LORA_WEIGHT_NAME

            path = Path(output_dir) / LORA_WEIGHT_NAME
            tmp = path.with_name(f".tmp-{path.name}")
            layers = {"unet_lora_layers": lora_state_dict, "unet_lora_adapter_metadata": adapter_metadata}
            for name, (state, metadata) in text.items():
                layers.update({f"{name}_lora_layers": state, f"{name}_lora_adapter_metadata": metadata})
            self.pipeline_class.save_lora_weights(str(output_dir), weight_name=tmp.name, **layers)
            os.replace(tmp, path)
            written["diffusers"] = path.name
        if "kohya" in formats:
            from ..tuners.kohya import save_kohya_lora

            labels = {**self.kohya_labels(), **(kohya_metadata or {})}
            kohya_text = {self.kohya_text_encoder_prefixes[name]: part for name, part in text.items()}
            written["kohya"] = save_kohya_lora(output_dir, lora_state_dict, adapter_metadata, labels, kohya_text).name
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
