"""PixArt family: `PixArtSigmaPipeline` (and `PixArtAlphaPipeline`) = `PixArtTransformer2DModel` + T5 text encoder +
`AutoencoderKL` + scheduler, text-conditioned, DDPM (epsilon) with learned sigma.

- text: T5's last hidden states and the tokenizer's attention mask (`prompt_embeds`, `prompt_attention_mask`), padded
  to the pipeline's own `max_sequence_length` (300 for Σ, 120 for α), as its `encode_prompt` computes them with
  `clean_caption=False` (lower-cased and stripped; caption cleaning needs bs4 and ftfy and rewrites captions).
  Caption dropout swaps in the empty prompt's embeddings and mask, which is also the pipeline's negative prompt.
- learned sigma: the transformer's second half of output channels are the variance (`ModelOutput.variance`, as DiT):
  never part of the structure term; trained by the VLB term with --learned_sigma_loss vlb.
- micro-conditioning: where the transformer has `use_additional_conditions` (PixArt-α 1024), `added_cond_kwargs`
  carries each sample's training size (h, w) and aspect ratio h / w, from the batch's `target_sizes`, as the α
  pipeline passes its output size. PixArt-Σ's transformers have it off and the Σ pipeline passes None.
- resolution: the positional embedding follows the input's token grid (PatchEmbed recomputes it around the base's
  `sample_size`), so any multiple of VAE factor x patch size trains, aspect-ratio buckets included, and the export
  keeps the base's config; validation grids sample at the trained resolution.
- LoRA: diffusers has no LoRA loader for PixArt pipelines: the merged export (always written) plus the adapter file,
  applied through `PeftAdapterMixin` as `FamilyAdapter.lora_usage` shows (the DiT recipe).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch import nn

from .base import ModelOutput
from .text import TextFamilyAdapter


def micro_conditions(target_sizes: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """PixArt-α's `added_cond_kwargs` per sample from (B, 2) (h, w) training sizes: `resolution` (B, 2) and
    `aspect_ratio` (B, 1) = h / w, fp32 (the transformer embeds them sinusoidally in fp32; bf16 would round sizes)."""
    sizes = target_sizes.to(device=device, dtype=torch.float32)
    return {"resolution": sizes, "aspect_ratio": (sizes[:, 0] / sizes[:, 1]).unsqueeze(1)}


class PixArtAdapter(TextFamilyAdapter):
    family = "pixart-sigma"
    display_name = "PixArt"
    pipeline_classes = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    denoiser_name = "transformer"
    # Self- and cross-attention projections and the MLP of every block (not adaLN-single, which carries the time).
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    # DDPM with learned sigma (the VLB term), DiffFit on its BasicTransformerBlocks; no stock LoRA loader in diffusers.
    capabilities = frozenset({"text", "ddpm", "learned_sigma", "aspect_ratio_buckets", "difffit",
                              "block_hidden_states"})
    capability_gaps = {"pos_embed_transfer": "PixArt's positional embedding already follows the token grid around "
                                             "the base's size",
                       "class_label_blocks": "PixArt's transformer is text-conditioned (no class labels)"}

    @property
    def max_sequence_length(self) -> int:
        """The T5 length the pipeline's `encode_prompt` pads to by default (300 for Σ, 120 for α)."""
        return inspect.signature(self.pipeline.encode_prompt).parameters["max_sequence_length"].default

    def aspect_ratio_bucket_multiple(self) -> int:
        return self.patch_multiple

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Prompts -> {"prompt_embeds": (B, L, d) T5 hidden states, "prompt_attention_mask": (B, L) int64}."""
        tokenizer, encoder = self.pipeline.tokenizer, self.pipeline.text_encoder
        inputs = tokenizer([p.lower().strip() for p in prompts], padding="max_length",
                           max_length=self.max_sequence_length, truncation=True, add_special_tokens=True,
                           return_tensors="pt")
        mask = inputs.attention_mask.to(device)
        return {"prompt_embeds": encoder(inputs.input_ids.to(device), attention_mask=mask)[0],
                "prompt_attention_mask": mask}

    def cached_text_inputs(self, prompt: str, num_images: int, device: torch.device) -> dict[str, torch.Tensor]:
        # The PixArt pipelines default `negative_prompt` to "" and refuse it beside `negative_prompt_embeds`.
        return {**super().cached_text_inputs(prompt, num_images, device), "negative_prompt": None}

    def conditioning(self, batch: dict[str, Any], device: torch.device, weight_dtype: torch.dtype,
                     drop: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        embeds = self.dropped_text_embeddings(batch, device, drop, generator)  # embeddings and mask together
        cond = {"encoder_hidden_states": embeds["prompt_embeds"],
                "encoder_attention_mask": embeds["prompt_attention_mask"]}
        if self.denoiser.use_additional_conditions:
            cond.update(micro_conditions(batch["target_sizes"], device))
        return cond

    def predict(self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> ModelOutput:
        added = {"resolution": conditioning.get("resolution"), "aspect_ratio": conditioning.get("aspect_ratio")}
        out = denoiser(noisy_latents, encoder_hidden_states=conditioning["encoder_hidden_states"],
                       encoder_attention_mask=conditioning["encoder_attention_mask"], timestep=timesteps,
                       added_cond_kwargs=added).sample
        return self.split_output(out)

    def feature_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        return list(denoiser.transformer_blocks)  # outputs: (B, tokens, hidden) token states

    def export_pipeline(self, denoiser: nn.Module) -> DiffusionPipeline:
        components = {**self.pipeline.components, "vae": self.vae, "transformer": denoiser}
        return type(self.pipeline)(**components)

    def sample_grid(self, pipeline: DiffusionPipeline, num_per_row: int, num_inference_steps: int,
                    guidance_scale: float, seed: int, conditions: list[str] | None) -> np.ndarray:
        rows = self.prompt_rows(pipeline, conditions, num_per_row)
        # At the trained size (binning would move it to the base's bins), encoded as in training (no cleaning).
        size = self.sample_resolution()
        fixed = {"height": size, "width": size, "use_resolution_binning": False, "clean_caption": False,
                 "max_sequence_length": self.max_sequence_length}
        return self._sample_rows(pipeline, [{**row, **fixed} for row in rows], num_inference_steps, guidance_scale,
                                 seed)

    def card_tags(self) -> list[str]:
        name = "pixart-alpha" if type(self.pipeline).__name__ == "PixArtAlphaPipeline" else self.family
        return [name, f"{name}-diffusers", "text-to-image"]
