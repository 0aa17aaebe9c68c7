"""The seam that keeps the training loop generic: one adapter per pipeline family.

An adapter turns a data batch into the denoiser's conditioning, calls the denoiser and splits its
output, and rebuilds the family's stock pipeline for export and sampling. A new family (SDXL,
PixArt, SD3) is one new subclass registered in `FAMILIES`.

What a batch offers `conditioning` (docs/design.md §8): `captions` or `class_labels`; the geometry of
each sample (`original_sizes`, `crop_top_lefts`, `target_sizes`, `flips`: `data.GEOMETRY_KEYS`), which
micro-conditioning reads; and with --cache_text_embeddings, `text_embeddings`: what `encode_text`
returned for each caption, read from disk (`text_embeddings` below hides the difference).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch import nn

from ..config.run import ModelConfig, RunConfig, TrainingConfig
from ..data.datasets import caption_text
from ..terms.registry import check_requirements
from ..utils.errors import ConfigError, InputError
from .vae import load_separate_vae, vae_dtype


@dataclass
class ModelOutput:
    model_pred: torch.Tensor  # (B, C, H, W): what the scheduler's prediction type asks for
    variance: torch.Tensor | None = None  # (B, C, H, W): learned-sigma channels, never fed to the structure term


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a batch of pixels or of cached latents."""
    key = "pixel_values" if "pixel_values" in batch else "latent_mean"
    return batch[key].shape[0]


def drop_to_empty(embeds: dict[str, torch.Tensor], empty: dict[str, torch.Tensor],
                  dropped: torch.Tensor) -> dict[str, torch.Tensor]:
    """Caption dropout for classifier-free guidance: the empty prompt's (1, ...) tensors where `dropped` (B,) is
    set, chosen on the device (no host sync)."""
    return {name: torch.where(dropped.view(-1, *[1] * (value.dim() - 1)), empty[name].to(value.dtype), value)
            for name, value in embeds.items()}


NUM_DEFAULT_PROMPTS = 4  # validation-grid rows of a text family when --validation_prompts is not given


def refuse_options(*rows: tuple[bool, str, str, str]) -> None:
    """`check_config`'s table: ConfigError(field, why, fix) for the first (refused, field, why, fix) row that holds."""
    for refused, field, why, fix in rows:
        if refused:
            raise ConfigError(field, why, fix)


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


class FamilyAdapter(ABC):
    family: str  # model-card tag, e.g. "dit"
    display_name: str = ""  # the family in messages, e.g. "Stable Diffusion XL"
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name`s this adapter accepts
    denoiser_name: str  # pipeline component that trains, e.g. "transformer"
    lora_target_modules: tuple[str, ...]  # default LoRA targets (module names or name suffixes)
    load_kwargs: dict[str, Any] = {}  # passed to DiffusionPipeline.from_pretrained, e.g. components to skip
    # Text families: the pipeline components that turn prompts into the denoiser's text inputs (`encode_text`).
    text_encoder_names: tuple[str, ...] = ()
    tokenizer_names: tuple[str, ...] = ()
    encode_text_version: int = 1  # part of the text-cache key: bump it when `encode_text` returns something else
    flow_matching: bool = False  # trained with flow matching (noise.FlowMatchProcess), not the DDPM process
    vae_fp32_under_bf16: bool = False  # the family's script keeps the VAE fp32 under bf16 too (vae.vae_dtype)
    hidden_output_index: int = 0  # which element of a feature block's tuple output is the image's hidden states
    latent_patch_size: int = 1  # latents per image-token side (Flux packs 2x2): a dynamic shift's token count
    guidance_embedding: bool = False  # the family has guidance-distilled denoisers (Flux.1-dev): --guidance_scale
    # What the family offers the loss terms (a term's `requires`, terms/registry.py): "block_hidden_states" (the
    # denoiser's per-block hidden states on its token grid, `feature_blocks`), "class_label_blocks" (a class-
    # conditional DiT-style transformer whose first blocks form an encoder), "class_labels" (class-conditional).
    # A term needing one the family lacks is refused before any weights load, with the family's reason from
    # `capability_gaps` (capability -> why, "{name}": display_name).
    capabilities: frozenset[str] = frozenset()
    capability_gaps: dict[str, str] = {}

    def __init__(self, pipeline: DiffusionPipeline, config: ModelConfig) -> None:
        self.pipeline = pipeline
        self.config = config
        self.vae = pipeline.vae
        self.text_cache = None  # a text_cache.TextEmbeddingCache, with --cache_text_embeddings
        self.empty_text_embeddings: dict[str, torch.Tensor] | None = None  # the empty prompt's, (1, ...), cached
        self.released_text_encoders: dict[str, type] = {}  # component name -> class, freed after caching

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    kohya_lora: bool = False  # whether `save_lora_weights` can also write the kohya format (--lora_export_format)
    # Whether the pipeline class's own `load_lora_weights` reads the diffusers-format LoRA file: then a LoRA run's
    # output is the LoRA file(s) alone (no merged pipeline unless --export_merged), sampled through that loader.
    stock_lora_loader: bool = False

    @classmethod
    def lora_formats(cls, model: ModelConfig) -> tuple[str, ...]:
        """The LoRA files a LoRA run writes ("diffusers", "kohya"): --lora_export_format, by default both where the
        family has the kohya format (ComfyUI and A1111 cannot read diffusers' SD/SDXL file), else diffusers."""
        chosen = model.lora_export_format or ("both" if cls.kohya_lora else "diffusers")
        return ("diffusers", "kohya") if chosen == "both" else (chosen,)

    @classmethod
    def exports_pipeline(cls, model: ModelConfig) -> bool:
        """Whether the run writes the full pipeline: full and DiffFit runs always; LoRA runs of a family without a
        stock LoRA loader too (the merged pipeline is their plain way to use the LoRA); others with --export_merged."""
        return not model.use_lora or not cls.stock_lora_loader or model.export_merged

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        """Raise ConfigError for options this family cannot honour; runs before any weights load. Subclasses
        call this first."""
        if config.model.use_lora and "kohya" in cls.lora_formats(config.model) and not cls.kohya_lora:
            raise ConfigError("lora_export_format", f"kohya LoRA files exist for Stable Diffusion 1.x/2.x and SDXL "
                              f"UNets, not for {', '.join(cls.pipeline_classes)}",
                              "drop --lora_export_format (the diffusers-format file is written)")
        check_requirements(config, cls)  # the loss terms this family cannot feed

    @classmethod
    def check_process_options(cls, config: RunConfig) -> None:
        """The flow-matching options need a flow-matching family, --guidance_scale a guidance-distilled one (checked
        before any weights load)."""
        if not cls.guidance_embedding and config.model.guidance_scale is not None:
            raise ConfigError("guidance_scale", f"is the guidance embedding's value of guidance-distilled models "
                              f"(Flux.1-dev) and the {cls.family} family has none", "drop --guidance_scale "
                              "(validation grids: --validation_guidance_scale)")
        scheme = config.flow_matching.weighting_scheme
        if not cls.flow_matching and scheme != "none":
            raise ConfigError("weighting_scheme", f"{scheme} is a flow-matching option and the {cls.family} family "
                              "trains with the DDPM process", "drop --weighting_scheme (DDPM: --snr_gamma)")
        if not cls.flow_matching and config.flow_matching.precondition_outputs:
            raise ConfigError("precondition_outputs", f"is a flow-matching option and the {cls.family} family trains "
                              "with the DDPM process", "drop --precondition_outputs (DDPM: the scheduler's "
                              "prediction_type sets the target)")

    def check_data(self, data: Any) -> None:
        """Raise if the data (a `data.TrainData`) cannot train this model; may remember validation defaults."""

    def validation_conditions(self, training: TrainingConfig) -> list | None:
        """The rows of a validation grid (class ids, prompts), as `sample_grid` takes them."""
        return None

    def default_resolution(self) -> int:
        """The base's native image size: the denoiser's `sample_size` latents times the VAE factor."""
        return self.denoiser.config.sample_size * self.vae_scale_factor

    @abstractmethod
    def check_resolution(self, resolution: int) -> None:
        """Raise ConfigError if the model cannot take images of this size."""

    def set_resolution(self, resolution: int) -> None:
        """Check `resolution` and make the denoiser (and each copy `load_component` makes of it) train and export at
        it; a family whose denoiser does not depend on the image size only checks."""
        self.check_resolution(resolution)

    @abstractmethod
    def frozen_modules(self) -> list[nn.Module]:
        """Modules that never train (moved to the device in `frozen_dtype`: weight_dtype, the VAE fp32 under fp16)."""

    def frozen_dtype(self, module: nn.Module, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype a frozen module is held in under mixed precision: weight_dtype, except the VAE, which stays fp32
        under fp16 (and under bf16 where the family's script keeps it so): models/vae.py."""
        return vae_dtype(weight_dtype, self.vae_fp32_under_bf16) if module is self.vae else weight_dtype

    @abstractmethod
    def prepare_training(self) -> None:
        """Put the denoiser into its training configuration (e.g. conditioning dropout handled by us)."""

    def aspect_ratio_bucket_multiple(self) -> int:
        """Sides of aspect-ratio buckets are multiples of this (in pixels); ConfigError where the denoiser takes
        square inputs only."""
        raise ConfigError("aspect_ratio_buckets", f"the {self.family} family trains on square images only",
                          "drop --aspect_ratio_buckets")

    @abstractmethod
    def conditioning(self, batch: dict[str, Any], device: torch.device, weight_dtype: torch.dtype,
                     drop: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Model inputs besides latents and timesteps; `drop` applies classifier-free-guidance dropout."""

    # -- text conditioning (families with text encoders) -------------------------------------------------
    def text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders still in memory, by pipeline component name."""
        return {name: module for name in self.text_encoder_names
                if (module := getattr(self.pipeline, name, None)) is not None}

    def tokenizers(self) -> dict[str, Any]:
        return {name: tokenizer for name in self.tokenizer_names
                if (tokenizer := getattr(self.pipeline, name, None)) is not None}

    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Prompts -> the denoiser's text inputs, each (B, ...), named as the pipeline's `__call__` takes them
        (`prompt_embeds`, `pooled_prompt_embeds`, `prompt_attention_mask`, ...)."""
        raise NotImplementedError(f"{type(self).__name__} has no text encoder")

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

    def text_embeddings(self, batch: dict[str, Any], device: torch.device
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The batch's text inputs (B, ...) and the empty prompt's (1, ...), read from the cache or encoded now."""
        if "text_embeddings" in batch:
            cached = {name: value.to(device) for name, value in batch["text_embeddings"].items()}
            return cached, self.empty_text_embeddings
        prompts = [caption_text(c) for c in batch.get("captions") or [""] * batch_size(batch)]
        encoded = self.encode_text(prompts + [""], device)  # one encoder pass over the batch and the empty prompt
        return {k: v[:-1] for k, v in encoded.items()}, {k: v[-1:] for k, v in encoded.items()}

    def cached_text_inputs(self, prompt: str, num_images: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Pipeline kwargs for `num_images` images of `prompt` from the text cache (the encoders are gone): its
        embeddings, and the empty prompt's as the negative ones, which is what the SD pipeline encodes for
        guidance when given no negative prompt (SDXL's adapter overrides this for `force_zeros_for_empty_prompt`)."""
        def repeat(embeds: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
            return {prefix + name: v.to(device).expand(num_images, *v.shape[1:]) for name, v in embeds.items()}

        positive = repeat(self.text_cache.load_batch([prompt], device))
        return {**positive, **repeat(self.empty_text_embeddings, "negative_")}

    @abstractmethod
    def predict(self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> ModelOutput: ...

    def feature_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        """The denoiser's blocks in depth order, whose outputs (hidden states) loss terms may read."""
        raise NotImplementedError(f"{type(self).__name__} exposes no feature blocks")

    @contextlib.contextmanager
    def capture_hidden(self, denoiser: nn.Module, indices: tuple[int, ...]) -> Iterator[dict[int, torch.Tensor]]:
        """Forward hooks on `feature_blocks(denoiser)[i]` for each i: the dict fills with each block's
        output (the first element of a tuple output), with its graph, during the forward inside."""
        captured: dict[int, torch.Tensor] = {}
        if not indices:
            yield captured
            return
        blocks = self.feature_blocks(denoiser)

        def hook(index: int):
            def store(module, args, output):
                captured[index] = output[self.hidden_output_index] if isinstance(output, (tuple, list)) else output
            return store

        handles = [blocks[i].register_forward_hook(hook(i)) for i in indices]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def disc_class_labels(self, conditioning: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return conditioning.get("class_labels")

    @abstractmethod
    def export_pipeline(self, denoiser: nn.Module) -> DiffusionPipeline:
        """A stock pipeline holding `denoiser` (an unwrapped module) and the frozen components."""

    @abstractmethod
    def sample_grid(self, pipeline: DiffusionPipeline, num_per_row: int, num_inference_steps: int,
                    guidance_scale: float, seed: int, conditions: list | None) -> np.ndarray:
        """(rows, cols, H, W, 3) float images in [0, 1] for a validation grid, one row per condition."""

    def load_component(self, name: str) -> nn.Module:
        """A fresh fp32 copy of a pipeline component, read from the pretrained source."""
        c = self.config
        module = self.pipeline.components[name]
        cls = type(module) if module is not None else self.released_text_encoders[name]
        if name == "vae" and c.pretrained_vae_model_name_or_path:
            return load_separate_vae(c, cls)
        return cls.from_pretrained(c.pretrained_model_name_or_path, subfolder=name, revision=c.revision,
                                   variant=c.variant, use_safetensors=not c.allow_pickle_weights or None)

    def reload_frozen_fp32(self) -> None:
        """Reload the frozen components from the source, undoing a cast to a half-precision weight_dtype, and
        bring back text encoders released after caching their embeddings, so that the export carries the base
        weights bit for bit."""
        for module in self.frozen_modules():
            name = next(k for k, v in self.pipeline.components.items() if v is module)
            fresh = self.load_component(name)
            setattr(self.pipeline, name, fresh)
            if name == "vae":
                self.vae = fresh
        for name in list(self.released_text_encoders):
            setattr(self.pipeline, name, self.load_component(name))
            del self.released_text_encoders[name]

    def save_lora_weights(self, output_dir: Path, lora_state_dict: dict[str, torch.Tensor],
                          adapter_metadata: dict[str, Any], kohya_metadata: dict[str, str] | None = None
                          ) -> dict[str, str]:
        """Write this run's LoRA file(s) (`lora_formats`) into `output_dir`, each atomically; returns format -> file
        name. The diffusers file: `pytorch_lora_weights.safetensors`, keys `<denoiser_name>.<peft key>` for every
        target module (`...to_q.lora_A.weight`, `...proj_in.lora_B.weight`), the LoRA config in the file's metadata:
        what diffusers' pipelines save and their `load_lora_weights` (`load_lora_adapter(prefix=...)`) read whole.
        `kohya_metadata`: what the kohya file records besides the family's own labels (title, resolution, ...)."""
        from diffusers.loaders.lora_base import LoraBaseMixin

        from ..tuners.lora import LORA_WEIGHT_NAME

        prefix, path = self.denoiser_name, Path(output_dir) / LORA_WEIGHT_NAME
        tmp = path.with_name(f".tmp-{path.name}")
        LoraBaseMixin.write_lora_layers(
            state_dict={f"{prefix}.{k}": v for k, v in lora_state_dict.items()}, save_directory=str(output_dir),
            is_main_process=True, weight_name=tmp.name, save_function=None, safe_serialization=True,
            lora_adapter_metadata={f"{prefix}.{k}": v for k, v in adapter_metadata.items()},
        )
        os.replace(tmp, path)
        return {"diffusers": path.name}

    def denoiser_config_overrides(self) -> dict[str, Any]:
        """Config values in which the trained denoiser differs from the base's (e.g. a DiT's sample_size after
        `set_resolution`): what `from_pretrained` of the base must be given to rebuild the trained model."""
        return {}

    # -- what the model card shows (card.py) ---------------------------------------------------------------------
    def resolved_conditions(self, conditions: list | None) -> list:
        """The rows a validation grid samples when given `conditions` (None: the family's defaults)."""
        return list(conditions or [])

    def condition_text(self, condition: Any) -> str:
        """A grid row's condition in words (the model card's widget caption): the prompt, or the class."""
        return str(condition)

    def example_call(self, condition: Any, num_inference_steps: int, guidance_scale: float, seed: int) -> str:
        """Code that makes one image `image` from `pipe` for `condition` (the model card's usage code): the first image
        of the final samples' row, with the same seed."""
        raise NotImplementedError(f"{type(self).__name__} has no example call")

    def base_load_options(self) -> str:
        """`, revision=..., variant=...` as the run loaded the base, for the card's `from_pretrained(base ...)`."""
        c = self.config
        return "".join(f", {name}={value!r}" for name, value in (("revision", c.revision), ("variant", c.variant))
                       if value is not None)

    def pipeline_usage(self, repo: str, call: str) -> str:
        """Model-card code that loads the exported pipeline folder (or its Hub repo) and makes an image."""
        return f"""import torch
from diffusers import DiffusionPipeline

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
pipe = DiffusionPipeline.from_pretrained("{repo}", dtype=dtype).to(device)
{call}
image.save("sample.png")"""

    def lora_usage(self, base: str, repo: str, weight_name: str, call: str) -> str:
        """Model-card code that applies the saved LoRA file to the base model and makes an image (no LoRA loader for
        this pipeline in diffusers: a subclass with diffusers' PeftAdapterMixin reads it)."""
        cls, name = type(self.denoiser).__name__, self.denoiser_name
        overrides = "".join(f", {k}={v!r}" for k, v in self.denoiser_config_overrides().items())
        indent = " " * len(f"{name}.load_lora_adapter(")
        options = self.base_load_options()
        return f"""import torch
from diffusers import DiffusionPipeline, {cls}
from diffusers.loaders import PeftAdapterMixin

class {cls}WithLoRA({cls}, PeftAdapterMixin):
    pass

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
{name} = {cls}WithLoRA.from_pretrained("{base}", subfolder="{name}"{options}{overrides}, dtype=dtype)
{name}.load_lora_adapter("{repo}", weight_name="{weight_name}",
{indent}prefix="{name}", use_safetensors=True)
pipe = DiffusionPipeline.from_pretrained("{base}", {name}={name}{options}, dtype=dtype).to(device)
{call}
image.save("sample.png")"""

    @staticmethod
    def _sample_rows(pipeline: DiffusionPipeline, rows: list[dict[str, Any]], num_inference_steps: int,
                     guidance_scale: float, seed: int) -> np.ndarray:
        """One pipeline call per row of conditioning kwargs, row i seeded with seed + i -> (rows, cols, H, W, 3)."""
        images = []
        for i, inputs in enumerate(rows):
            generator = torch.Generator(device="cpu").manual_seed(seed + i)
            images.append(pipeline(**inputs, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                   generator=generator, output_type="np").images)
        return np.stack(images)

    def card_tags(self) -> list[str]:
        return [self.family]


class CaptionedFamily:
    """For text-to-image adapters (before FamilyAdapter in the bases): the data must carry captions, and its
    first distinct captions are the validation grid's prompts unless --validation_prompts names some."""

    default_prompts: list[str] | None = None
    display_name: str
    capability_gaps = {"class_labels": "{name} is text-conditioned and has no class labels"}

    @classmethod
    def text_refusals(cls, config: RunConfig) -> tuple[tuple[bool, str, str, str], ...]:
        """The `refuse_options` rows every text family shares: nothing class-conditional."""
        return (
            (config.training.validation_class_labels is not None, "validation_class_labels",
             f"{cls.display_name} takes prompts, not class ids", "use --validation_prompts instead"),
        )

    def check_data(self, data: Any) -> None:
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

    def example_call(self, condition: str, num_inference_steps: int, guidance_scale: float, seed: int) -> str:
        return (f"image = pipe({json.dumps(condition, ensure_ascii=False)}, num_inference_steps={num_inference_steps}, "
                f"guidance_scale={guidance_scale}, generator=torch.manual_seed({seed})).images[0]")
