"""What every text-to-image family shares, written once: `TextFamilyAdapter`, the base of the SD, SDXL, SD3, Flux and
PixArt adapters.

A text family names its text encoders and tokenizers (`text_encoder_names`, `tokenizer_names`) and writes
`encode_text` (prompts -> the denoiser's text inputs, exactly as its pipeline's `encode_prompt`); this base does the
rest: the captions of a batch, or their cached embeddings with --cache_text_embeddings (`text_embeddings`), caption
dropout to the empty prompt for classifier-free guidance (`dropped_text_embeddings`), releasing the encoders after
caching, the data check (one caption per image) and the validation grid's prompts, which it samples through the
pipeline's prompts or, once the encoders are released, through their cached embeddings. It declares nothing: each
family lists its capabilities (`FamilyAdapter.capabilities`), "text" among them.
"""

from __future__ import annotations

import contextlib
import gc
import json
from abc import abstractmethod
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch import nn

from ..config.run import ModelConfig, TrainingConfig
from ..data.datasets import caption_text
from ..utils.errors import InputError
from .base import FamilyAdapter, batch_size

NUM_DEFAULT_PROMPTS = 4  # validation-grid rows of a text family when --validation_prompts is not given


def drop_to_empty(embeds: dict[str, torch.Tensor], empty: dict[str, torch.Tensor],
                  dropped: torch.Tensor) -> dict[str, torch.Tensor]:
    """Caption dropout for classifier-free guidance: the empty prompt's (1, ...) tensors where `dropped` (B,) is
    set, chosen on the device (no host sync)."""
    return {name: torch.where(dropped.view(-1, *[1] * (value.dim() - 1)), empty[name].to(value.dtype), value)
            for name, value in embeds.items()}


def caption_prompts(data: Any, who: str) -> list[str]:
    """A text family's data check: `data` (a `data.TrainData`) must carry one caption per image. Returns the validation
    grid's default prompts: the instance prompt (--instance_prompt with its prefix) when given, else the first
    distinct captions of its first 64 samples."""
    if data.caption_column is None:
        raise InputError(
            f"caption_column: {data.description} has no caption column; {who} needs one caption per image: put "
            "a .txt file beside each image (a.png -> a.txt), add metadata.jsonl (file_name, text) to the image folder, "
            "pass --instance_prompt for all of them, or --caption_column <name> for a datasets set"
        )
    if getattr(data, "instance_prompt", None):
        return [data.instance_prompt]
    head = data.dataset.select(range(min(64, len(data.dataset))))[data.caption_column]
    prompts = list(dict.fromkeys(caption_text(c) for c in head if caption_text(c)))
    return prompts[:NUM_DEFAULT_PROMPTS] or [""]


class TextFamilyAdapter(FamilyAdapter):
    """A text-to-image family: captions in, the text encoders' outputs as the denoiser's conditioning."""

    # The pipeline components that turn prompts into the denoiser's text inputs (`encode_text`).
    text_encoder_names: tuple[str, ...] = ()
    tokenizer_names: tuple[str, ...] = ()
    encode_text_version: int = 1  # part of the text-cache key: bump it when `encode_text` returns something else
    default_prompts: list[str] | None = None  # the validation grid's prompts unless --validation_prompts: check_data

    def __init__(self, pipeline: DiffusionPipeline, config: ModelConfig) -> None:
        super().__init__(pipeline, config)
        self.text_cache = None  # a text_cache.TextEmbeddingCache, with --cache_text_embeddings
        self.empty_text_embeddings: dict[str, torch.Tensor] | None = None  # the empty prompt's, (1, ...), cached
        # --train_text_encoder (SD, SDXL): the prepared text encoders with LoRA, by component name (train.builders)
        self.trained_text_encoders: dict[str, nn.Module] = {}

    # -- the text encoders -------------------------------------------------------------------------------------
    def text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders still in memory, by pipeline component name."""
        return {name: module for name in self.text_encoder_names
                if (module := getattr(self.pipeline, name, None)) is not None}

    def text_encoder_module(self, name: str) -> nn.Module:
        """The module that encodes with text encoder `name`: the prepared (DDP-wrapped where launched so) LoRA'd
        encoder with --train_text_encoder, else the pipeline's frozen one."""
        trained = self.trained_text_encoders.get(name)
        return trained if trained is not None else getattr(self.pipeline, name)

    def text_grad(self) -> contextlib.AbstractContextManager:
        """Where `encode_text` runs: without grad for frozen encoders; with --train_text_encoder under the caller's
        grad mode (the loop's conditioning backpropagates into their LoRA)."""
        return contextlib.nullcontext() if self.trained_text_encoders else torch.no_grad()

    def tokenizers(self) -> dict[str, Any]:
        return {name: tokenizer for name in self.tokenizer_names
                if (tokenizer := getattr(self.pipeline, name, None)) is not None}

    @abstractmethod
    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Prompts -> the denoiser's text inputs, each (B, ...), named as the pipeline's `__call__` takes them
        (`prompt_embeds`, `pooled_prompt_embeds`, `prompt_attention_mask`, ...)."""

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, *self.text_encoders().values()]

    def prepare_training(self) -> None:
        """Nothing to switch off: caption dropout happens in `conditioning`, the text encoders stay frozen."""

    # -- the text cache ----------------------------------------------------------------------------------------
    def use_text_cache(self, cache: Any, device: torch.device) -> None:
        """Take text inputs from `cache` (a text_cache.TextEmbeddingCache holding every prompt of the run)."""
        self.text_cache = cache
        self.empty_text_embeddings = cache.load_batch([""], device)

    def release_text_encoders(self) -> None:
        """Drop the text encoders from the pipeline, and so from memory; `reload_frozen_fp32` brings them back."""
        for name in list(self.text_encoders()):  # names only: no reference to a module outlives the loop
            self.released_text_encoders[name] = type(getattr(self.pipeline, name))
            setattr(self.pipeline, name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def cached_text_inputs(self, prompt: str, num_images: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Pipeline kwargs for `num_images` images of `prompt` from the text cache (the encoders are gone): its
        embeddings, and the empty prompt's as the negative ones, which is what the SD pipeline encodes for
        guidance when given no negative prompt (SDXL's adapter overrides this for `force_zeros_for_empty_prompt`)."""
        def repeat(embeds: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
            return {prefix + name: v.to(device).expand(num_images, *v.shape[1:]) for name, v in embeds.items()}

        positive = repeat(self.text_cache.load_batch([prompt], device))
        return {**positive, **repeat(self.empty_text_embeddings, "negative_")}

    # -- conditioning ------------------------------------------------------------------------------------------
    def text_embeddings(self, batch: dict[str, Any], device: torch.device
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The batch's text inputs (B, ...) and the empty prompt's (1, ...), read from the cache or encoded now."""
        if "text_embeddings" in batch:
            cached = {name: value.to(device) for name, value in batch["text_embeddings"].items()}
            return cached, self.empty_text_embeddings
        prompts = [caption_text(c) for c in batch.get("captions") or [""] * batch_size(batch)]
        # One encoder pass over the batch and the empty prompt; with --train_text_encoder the empty prompt is encoded
        # by the LoRA'd encoders too, with grad (what diffusers' empty captions before encoding compute).
        encoded = self.encode_text(prompts + [""], device)
        return {k: v[:-1] for k, v in encoded.items()}, {k: v[-1:] for k, v in encoded.items()}

    def dropped_text_embeddings(self, batch: dict[str, Any], device: torch.device, drop: bool,
                                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The batch's `encode_text` outputs (B, ...), the empty prompt's in place of a caption with probability
        `caption_dropout_prob` when `drop`: every text input of a dropped sample (embeddings, pooled embeddings,
        attention mask) together."""
        embeds, empty = self.text_embeddings(batch, device)  # (B, ...) each; the empty prompt's (1, ...)
        p = self.config.caption_dropout_prob
        if drop and p > 0:
            dropped = torch.rand(batch_size(batch), device=device, generator=generator) < p
            embeds = drop_to_empty(embeds, empty, dropped)
        return embeds

    def disc_class_labels(self, conditioning: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    # -- data and validation -----------------------------------------------------------------------------------
    def check_data(self, data: Any) -> None:
        """The data must carry captions; its first distinct captions are the validation grid's prompts unless
        --validation_prompts names some."""
        self.default_prompts = caption_prompts(data, self.display_name)

    def validation_conditions(self, training: TrainingConfig) -> list[str] | None:
        return training.validation_prompts or self.default_prompts

    def resolved_conditions(self, conditions: list[str] | None) -> list[str]:
        return list(conditions or self.default_prompts or [""])

    def prompt_rows(self, pipeline: Any, conditions: list[str] | None, num_per_row: int) -> list[dict[str, Any]]:
        """The validation grid's rows as pipeline-call kwargs: the prompts, or their cached embeddings when the
        text encoders were released after caching (`cached_text_inputs`)."""
        prompts = self.resolved_conditions(conditions)
        if pipeline.text_encoder is None:
            return [self.cached_text_inputs(prompt, num_per_row, pipeline.device) for prompt in prompts]
        return [{"prompt": [prompt] * num_per_row} for prompt in prompts]

    def sample_grid(self, pipeline: DiffusionPipeline, num_per_row: int, num_inference_steps: int,
                    guidance_scale: float, seed: int, conditions: list[str] | None) -> np.ndarray:
        rows = self.prompt_rows(pipeline, conditions, num_per_row)
        return self._sample_rows(pipeline, rows, num_inference_steps, guidance_scale, seed)

    def example_call(self, condition: str, num_inference_steps: int, guidance_scale: float, seed: int) -> str:
        return (f"image = pipe({json.dumps(condition, ensure_ascii=False)}, num_inference_steps={num_inference_steps}, "
                f"guidance_scale={guidance_scale}, generator=torch.manual_seed({seed})).images[0]")

    def card_tags(self) -> list[str]:
        return [self.family, "text-to-image"]


class PackedLatentsMixin:
    """Sizes of a family whose pipeline packs 2x2 latents into one token (Flux, Qwen-Image): the packing as its
    patch size (images at multiples of the VAE factor times it), and the pipeline's default size. Put before the
    adapter base: `class FluxAdapter(PackedLatentsMixin, TextFamilyAdapter)`."""

    latent_patch_size = 2  # 2x2 latents per token, packed by the pipeline (the transformer's own patch size is 1)

    def default_resolution(self) -> int:
        return self.pipeline.default_sample_size * self.vae_scale_factor  # the pipeline's default height / width

    def aspect_ratio_bucket_multiple(self) -> int:
        return self.patch_multiple  # packed: both latent sides a multiple of the packing
