"""Flux.1 family (`FluxPipeline`: dev and schnell): an MMDiT with single-stream blocks (`FluxTransformer2DModel`)
trained with flow matching on packed 2x2 latents, CLIP (pooled) + T5 text, and for guidance-distilled models
(dev) a guidance embedding.

What differs from SD3 (`sd3.StableDiffusion3Adapter`, whose structure this follows: both are
`text.TextFamilyAdapter`s; the reference is diffusers' examples/dreambooth/train_dreambooth_lora_flux.py,
docs/defaults.md):
- the loop, the process and the terms keep (B, C, h, w) latents: `predict` packs them into 2x2 tokens with their
  position ids (`FluxPipeline._pack_latents`, `_prepare_latent_image_ids`), calls the transformer with
  timestep = sigma (t / 1000), zero text ids and, where `guidance_embeds`, the guidance value (--guidance_scale),
  and unpacks the velocity (`_unpack_latents`), so x0_hat, SADM and D see the latent grid as for every family;
- the scheduler's dynamic shift (mu from the image's token count) is applied by `noise.FlowMatchProcess`, told
  the 2x2 packing through `latent_patch_size`;
- text: `encode_text` is `FluxPipeline.encode_prompt`: CLIP's pooled output, T5's hidden states at the
  pipeline's `max_sequence_length` (512, its __call__ default, capped by tokenizer_2's model_max_length);
- the feature blocks are the dual-stream then the single-stream blocks; both return (text tokens, image tokens);
- the LoRA file is written by `FluxPipeline.save_lora_weights`, which the pipeline's `load_lora_weights` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from torch import nn

from .base import ModelOutput, save_with_pipeline_writer
from .text import PackedLatentsMixin, TextFamilyAdapter

FLUX_GUIDANCE_DEFAULT = 3.5  # train_dreambooth_lora_flux.py --guidance_scale, FluxPipeline.__call__'s default


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C) tokens, as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack` for an (h, w) latent grid."""
    return FluxPipeline._unpack_latents(tokens, h, w, 1)  # vae factor 1: h and w are latent sizes already


class FluxAdapter(PackedLatentsMixin, TextFamilyAdapter):
    family = "flux"
    display_name = "Flux.1"
    pipeline_classes = ("FluxPipeline",)
    pipeline_class = FluxPipeline
    denoiser_name = "transformer"
    # train_dreambooth_lora_flux.py's default --lora_layers: attention of both streams and the dual blocks' MLPs.
    lora_target_modules = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                           "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                           "ff_context.net.0.proj", "ff_context.net.2")
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    # Guidance-distilled dev takes --guidance_scale; no kohya file, no DiffFit (no BasicTransformerBlocks).
    capabilities = frozenset({"text", "flow_matching", "guidance_embedding", "aspect_ratio_buckets",
                              "stock_lora_loader", "block_hidden_states"})
    capability_gaps = {"pos_embed_transfer": "Flux's rotary position ids follow the image size",
                       "class_label_blocks": "Flux's transformer is text-conditioned (REPA reads its image tokens: "
                                             "--repa_weight)"}
    vae_fp32_under_bf16 = False  # the script casts the VAE to the weight dtype
    hidden_output_index = 1  # FluxTransformerBlock and FluxSingleTransformerBlock return (text, image) tokens
    max_sequence_length = 512  # T5 tokens: FluxPipeline.__call__'s default

    @property
    def guidance_scale(self) -> float | None:
        """The guidance embedding's training value, None for a transformer without one (schnell)."""
        if not self.denoiser.config.guidance_embeds:
            return None
        value = self.config.guidance_scale
        return FLUX_GUIDANCE_DEFAULT if value is None else value

    @property
    def t5_length(self) -> int:
        return min(self.max_sequence_length, self.pipeline.tokenizer_2.model_max_length) \
            if self.pipeline.tokenizer_2 is not None else self.max_sequence_length

    def sample_grid(self, pipeline: DiffusionPipeline, num_per_row: int, num_inference_steps: int,
                    guidance_scale: float, seed: int, conditions: list[str] | None) -> np.ndarray:
        rows = self.prompt_rows(pipeline, conditions, num_per_row)
        # At the trained size (FluxPipeline's default is 1024 px whatever the run trained), T5 as in training.
        size = self.sample_resolution()
        fixed = {"height": size, "width": size, "max_sequence_length": self.t5_length}
        return self._sample_rows(pipeline, [{**row, **fixed} for row in rows], num_inference_steps, guidance_scale,
                                 seed)

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Prompts -> {"prompt_embeds": (B, T5 tokens, joint_attention_dim), "pooled_prompt_embeds": (B, CLIP
        width)}, `FluxPipeline.encode_prompt` at the pipeline's max_sequence_length."""
        p = self.pipeline
        ids = p.tokenizer(prompts, padding="max_length", max_length=p.tokenizer_max_length, truncation=True,
                          return_tensors="pt").input_ids
        pooled = p.text_encoder(ids.to(device), output_hidden_states=False).pooler_output.to(p.text_encoder.dtype)
        ids = p.tokenizer_2(prompts, padding="max_length", max_length=self.t5_length, truncation=True,
                            return_tensors="pt").input_ids
        embeds = p.text_encoder_2(ids.to(device), output_hidden_states=False)[0].to(p.text_encoder_2.dtype)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def conditioning(self, batch: dict[str, Any], device: torch.device, weight_dtype: torch.dtype,
                     drop: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        # Caption dropout replaces the T5 and the pooled CLIP embeddings by the empty prompt's, together.
        embeds = self.dropped_text_embeddings(batch, device, drop, generator)
        cond = {"encoder_hidden_states": embeds["prompt_embeds"], "pooled_projections": embeds["pooled_prompt_embeds"]}
        if self.guidance_scale is not None:  # the script: torch.tensor([guidance_scale]).expand(B)
            cond["guidance"] = torch.full((cond["pooled_projections"].shape[0],), self.guidance_scale,
                                          device=device, dtype=torch.float32)
        return cond

    def predict(self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> ModelOutput:
        b, _, h, w = noisy_latents.shape
        text = conditioning["encoder_hidden_states"]
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy_latents.device, noisy_latents.dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=noisy_latents.device, dtype=noisy_latents.dtype)
        out = denoiser(hidden_states=pack(noisy_latents), timestep=timesteps / 1000,
                       guidance=conditioning.get("guidance"), pooled_projections=conditioning["pooled_projections"],
                       encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return ModelOutput(unpack(out, h, w))  # the velocity eps - x0 on the latent grid

    def feature_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        # Outputs read: the image tokens, (B, h/2 * w/2, inner_dim), of the dual- then the single-stream blocks.
        return [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]

    def export_pipeline(self, denoiser: nn.Module) -> DiffusionPipeline:
        return FluxPipeline(**{**self.pipeline.components, "vae": self.vae, "transformer": denoiser})

    def save_lora_weights(self, output_dir: Path, lora_state_dict: dict[str, torch.Tensor],
                          adapter_metadata: dict[str, Any], kohya_metadata: dict[str, str] | None = None
                          ) -> dict[str, str]:
        """`FluxPipeline.save_lora_weights`, which the pipeline's `load_lora_weights` reads."""
        return save_with_pipeline_writer(FluxPipeline, output_dir, lora_state_dict, adapter_metadata)

    def card_tags(self) -> list[str]:
        return [self.family, "flux-diffusers", "text-to-image"]  # as train_dreambooth_lora_flux.py tags its cards
