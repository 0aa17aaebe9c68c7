"""Qwen-Image family (`QwenImagePipeline`): an MMDiT (`QwenImageTransformer2DModel`, dual-stream blocks only)
trained with flow matching on packed 2x2 latents of a causal 3D VAE (`AutoencoderKLQwenImage`), conditioned on the
last hidden states of Qwen2.5-VL with the pipeline's prompt template.

What differs from Flux (`flux.FluxAdapter`, whose structure this follows; the reference is diffusers'
examples/dreambooth/train_dreambooth_lora_qwen_image.py, docs/defaults.md):
- the VAE takes and returns videos (B, C, frames, H, W) and normalises its latents per channel,
  (z - latents_mean) / latents_std, where the 2D VAEs have one `scaling_factor` / `shift_factor`. The loop, the
  latent cache, REPA and SADM's feature space see `adapter.vae`, a `QwenImageLatentVAE`: the same module behind the
  2D interface every family's VAE has (pixels (B, 3, H, W) in, normalised latents (B, C, h, w) out, scaling 1 and
  shift 0), which adds the one frame on the way in and drops it on the way out. The pipeline (validation, export)
  holds the stock VAE itself;
- text: `encode_text` is `QwenImagePipeline.encode_prompt`: the prompt in the pipeline's chat template, Qwen2.5-VL's
  last hidden states with the template's system prefix (`prompt_template_encode_start_idx` tokens) dropped, at most
  `max_sequence_length` (512) tokens, and the mask of the real tokens (`prompt_embeds_mask`); each prompt's is padded
  with zeros (mask 0) to 512 tokens so that prompts stack and cache. `conditioning` cuts the batch back to its
  longest prompt (one host sync a step) and passes no mask when every token is real, as the pipeline does: masked
  text tokens change nothing in the transformer, and the unpadded batch is what the pipeline and the script feed it;
- `predict` packs the latents 2x2 (`QwenImagePipeline._pack_latents`), passes `img_shapes` [(1, h/2, w/2)] per
  image and timestep = sigma, and unpacks the velocity (`_unpack_latents`, without its frame axis);
- the scheduler's dynamic shift (exponential, mu from the image's token count, `max_image_seq_len` 8192) is applied by
  `diffusion.process.FlowMatchProcess` as for Flux; the script draws unshifted sigmas (docs/defaults.md);
- validation grids use the pipeline's classifier-free guidance, `true_cfg_scale` with the empty prompt as the
  negative one (`guidance_scale` is the embedding of guidance-distilled models, which Qwen-Image is not);
- the LoRA file is written by `QwenImagePipeline.save_lora_weights`, which the pipeline's `load_lora_weights` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, QwenImagePipeline
from diffusers.configuration_utils import FrozenDict
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..config.run import RunConfig
from .base import ModelOutput, refuse_options, save_with_pipeline_writer
from .text import PackedLatentsMixin, TextFamilyAdapter
from .vae import vae_dtype

QWEN_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s and train_dreambooth_lora_qwen_image.py's default


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C) tokens, as QwenImagePipeline packs its (B, 1, C, h, w) latents."""
    b, c, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack` for an (h, w) latent grid: `_unpack_latents` (which returns (B, C, 1, h, w)) without the
    frame axis."""
    return QwenImagePipeline._unpack_latents(tokens, h, w, 1)[:, :, 0]  # vae factor 1: h and w are latent sizes


class NormalizedPosterior:
    """The 3D VAE's posterior of one frame, normalised as the pipeline's latents are: mean (mu - latents_mean) /
    latents_std, std sigma / latents_std, in the VAE's dtype, (B, C, h, w). `sample` draws as diffusers'
    DiagonalGaussianDistribution does (and as `latents.sample_latents` draws from a cached posterior)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean, self.std = mean, std

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class QwenImageLatentVAE(nn.Module):
    """`AutoencoderKLQwenImage` (held, not copied: `self.model`) behind the 2D VAE interface the family-generic code
    uses: `encode(pixels (B, 3, H, W)).latent_dist` with normalised (B, C, h, w) latents, `decode(latents).sample`
    (B, 3, H, W), and a config whose `scaling_factor` is 1 and `shift_factor` None (the normalisation is done here)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.model = vae
        self.config = FrozenDict({**vae.config, "scaling_factor": 1.0, "shift_factor": None,
                                  "latent_channels": vae.config.z_dim})

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents_mean and 1 / latents_std as (1, C, 1, 1, 1), as the pipeline and the script build them."""
        c = self.model.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    def encode(self, pixels: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput:
        posterior = self.model.encode(pixels.unsqueeze(2)).latent_dist  # one frame: (B, C, 1, h, w)
        mu, sigma = posterior.mean.float(), posterior.std.float()
        mean, inv_std = self._stats(mu)
        # The script's (z - latents_mean) * latents_std (its latents_std = 1 / std, fp32), applied to mu and sigma,
        # then back in the VAE's dtype, in which the draw is made (as `latents.sample_latents` makes it).
        normalized = NormalizedPosterior(((mu - mean) * inv_std)[:, :, 0].to(posterior.mean.dtype),
                                         (sigma * inv_std)[:, :, 0].to(posterior.mean.dtype))
        return AutoencoderKLOutput(latent_dist=normalized)

    def decode(self, latents: torch.Tensor, return_dict: bool = True) -> DecoderOutput:
        """Normalised (B, C, h, w) latents -> (B, 3, H, W) pixels, as QwenImagePipeline.__call__ decodes."""
        z = latents.unsqueeze(2).to(self.dtype)
        mean, inv_std = self._stats(z)
        return DecoderOutput(sample=self.model.decode(z / inv_std + mean).sample[:, :, 0])


class QwenImageAdapter(PackedLatentsMixin, TextFamilyAdapter):
    family = "qwen-image"
    display_name = "Qwen-Image"
    pipeline_classes = ("QwenImagePipeline",)
    pipeline_class = QwenImagePipeline
    denoiser_name = "transformer"
    # train_dreambooth_lora_qwen_image.py's default --lora_layers: the image stream's attention projections.
    lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0")
    load_kwargs: dict[str, Any] = {}
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    # No guidance embedding (Qwen-Image is not guidance-distilled), no kohya file, no DiffFit.
    capabilities = frozenset({"text", "flow_matching", "aspect_ratio_buckets", "stock_lora_loader",
                              "block_hidden_states"})
    capability_gaps = {"pos_embed_transfer": "Qwen-Image's rotary position ids follow the image size",
                       "class_label_blocks": "Qwen-Image's MMDiT is text-conditioned (REPA reads its image tokens: "
                                             "--repa_weight)"}
    vae_fp32_under_bf16 = False  # the script casts the VAE to the weight dtype
    hidden_output_index = 1  # QwenImageTransformerBlock returns (text tokens, image tokens)
    max_sequence_length = QWEN_MAX_SEQUENCE_LENGTH

    def __init__(self, pipeline: DiffusionPipeline, config) -> None:
        super().__init__(pipeline, config)
        self.vae = QwenImageLatentVAE(pipeline.vae)

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        super().check_config(config)
        refuse_options(
            (bool(config.model.pretrained_vae_model_name_or_path), "pretrained_vae_model_name_or_path",
             "Qwen-Image's causal 3D VAE (AutoencoderKLQwenImage) is part of the pipeline and has no drop-in "
             "replacement", "drop --pretrained_vae_model_name_or_path"),
        )

    # -- sizes: packed 2x2 latents, the pipeline's default size --------------------------------------------------
    # -- the 3D VAE behind the 2D interface ------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.pipeline.vae.config.z_dim

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.pipeline.vae.temperal_downsample)  # QwenImagePipeline.vae_scale_factor

    def frozen_modules(self) -> list[nn.Module]:
        return [self.pipeline.vae, *self.text_encoders().values()]

    def frozen_dtype(self, module: nn.Module, weight_dtype: torch.dtype) -> torch.dtype:
        return vae_dtype(weight_dtype, self.vae_fp32_under_bf16) if module is self.pipeline.vae else weight_dtype

    def reload_frozen_fp32(self) -> None:
        super().reload_frozen_fp32()
        self.vae = QwenImageLatentVAE(self.pipeline.vae)  # the reloaded VAE behind the 2D interface again

    # -- text ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Prompts -> {"prompt_embeds": (B, 512, text width), "prompt_embeds_mask": (B, 512) int64}:
        `QwenImagePipeline.encode_prompt` at max_sequence_length 512 (its mask made explicit where it returns None
        for a batch without padding), zero-padded with mask 0 to 512 tokens."""
        embeds, mask = self.pipeline.encode_prompt(prompt=prompts, device=device,
                                                   max_sequence_length=self.max_sequence_length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad = self.max_sequence_length - embeds.shape[1]
        embeds = torch.cat([embeds, embeds.new_zeros(embeds.shape[0], pad, embeds.shape[2])], dim=1)
        mask = torch.cat([mask.long(), mask.new_zeros(mask.shape[0], pad, dtype=torch.long)], dim=1)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def conditioning(self, batch: dict[str, Any], device: torch.device, weight_dtype: torch.dtype,
                     drop: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor | None]:
        # Caption dropout replaces the embeddings and the mask by the empty prompt's, together.
        embeds = self.dropped_text_embeddings(batch, device, drop, generator)
        return trim_text(embeds["prompt_embeds"], embeds["prompt_embeds_mask"])

    def predict(self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> ModelOutput:
        b, _, h, w = noisy_latents.shape
        out = denoiser(hidden_states=pack(noisy_latents), timestep=timesteps / 1000,
                       encoder_hidden_states=conditioning["encoder_hidden_states"],
                       encoder_hidden_states_mask=conditioning.get("encoder_hidden_states_mask"),
                       img_shapes=[(1, h // 2, w // 2)] * b, return_dict=False)[0]
        return ModelOutput(unpack(out, h, w))  # the velocity eps - x0 on the latent grid

    def feature_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        # Outputs read: the image tokens, (B, h/2 * w/2, inner_dim), of the dual-stream blocks.
        return list(denoiser.transformer_blocks)

    # -- sampling and export ---------------------------------------------------------------------------------------
    def cached_text_inputs(self, prompt: str, num_images: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The prompt's and the empty prompt's cached embeddings, each cut to its own tokens (what encode_prompt
        returns for one prompt), as `prompt_embeds(_mask)` and `negative_prompt_embeds(_mask)`."""
        def one(embeds: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
            n = max(int(embeds["prompt_embeds_mask"].sum()), 1)
            x, m = embeds["prompt_embeds"][:, :n].to(device), embeds["prompt_embeds_mask"][:, :n].to(device)
            return {f"{prefix}prompt_embeds": x.expand(num_images, *x.shape[1:]),
                    f"{prefix}prompt_embeds_mask": m.expand(num_images, *m.shape[1:])}

        return {**one(self.text_cache.load_batch([prompt], device), ""), **one(self.empty_text_embeddings,
                                                                                "negative_")}

    def sample_grid(self, pipeline: DiffusionPipeline, num_per_row: int, num_inference_steps: int,
                    guidance_scale: float, seed: int, conditions: list[str] | None) -> np.ndarray:
        rows = self.prompt_rows(pipeline, conditions, num_per_row)
        size = self.sample_resolution()
        # QwenImagePipeline guides with true_cfg_scale against a negative prompt: the empty one, which caption
        # dropout trains (the cached rows carry its embeddings already).
        guided = guidance_scale > 1
        rows = [{**{k: v for k, v in row.items() if guided or not k.startswith("negative_")}, "height": size,
                 "width": size, "true_cfg_scale": guidance_scale,
                 **({"negative_prompt": [""] * num_per_row} if guided and "prompt" in row else {})} for row in rows]
        images = []
        for i, inputs in enumerate(rows):
            generator = torch.Generator(device="cpu").manual_seed(seed + i)
            images.append(pipeline(**inputs, num_inference_steps=num_inference_steps, generator=generator,
                                   output_type="np").images)
        return np.stack(images)

    def example_call(self, condition: str, num_inference_steps: int, guidance_scale: float, seed: int) -> str:
        return (f"image = pipe({json.dumps(condition, ensure_ascii=False)}, negative_prompt=\"\", "
                f"num_inference_steps={num_inference_steps}, true_cfg_scale={guidance_scale}, "
                f"generator=torch.manual_seed({seed})).images[0]")

    def export_pipeline(self, denoiser: nn.Module) -> DiffusionPipeline:
        return QwenImagePipeline(**{**self.pipeline.components, "transformer": denoiser})

    def save_lora_weights(self, output_dir: Path, lora_state_dict: dict[str, torch.Tensor],
                          adapter_metadata: dict[str, Any], kohya_metadata: dict[str, str] | None = None
                          ) -> dict[str, str]:
        """`QwenImagePipeline.save_lora_weights`, which the pipeline's `load_lora_weights` reads."""
        return save_with_pipeline_writer(QwenImagePipeline, output_dir, lora_state_dict, adapter_metadata)

    def card_tags(self) -> list[str]:
        return [self.family, "qwen-image-diffusers", "text-to-image"]


def trim_text(embeds: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Padded (B, 512, D) embeddings and (B, 512) mask -> the transformer's text inputs cut to the batch's longest
    prompt, the mask None when no token of the cut is padding (QwenImagePipeline.encode_prompt's rule). One host
    sync: the longest and the shortest prompt's lengths."""
    lengths = mask.sum(dim=1)
    longest, shortest = torch.stack([lengths.max(), lengths.min()]).tolist()
    longest = max(longest, 1)  # a batch of empty sequences cannot occur (the template's tail is always there)
    kept = mask[:, :longest]
    return {"encoder_hidden_states": embeds[:, :longest],
            "encoder_hidden_states_mask": None if shortest >= longest else kept}
