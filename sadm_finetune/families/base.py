"""The seam that keeps the training loop generic: one adapter per pipeline family.

An adapter turns a data batch into the denoiser's conditioning, calls the denoiser and splits its
output, and rebuilds the family's stock pipeline for export and sampling. A new family (SDXL,
PixArt, SD3) is one new subclass registered in `FAMILIES`; a text-to-image one subclasses
`text.TextFamilyAdapter`, which holds what every text family shares.

A family declares what it can do (`FamilyAdapter.capabilities`, names from `CAPABILITIES`); every option that needs
one of them is a row of `REQUIREMENTS`, and `FamilyAdapter.check_capabilities` refuses the first row the family does
not declare, in one line, before any weights load. A family that declares nothing refuses every optional feature.

What a batch offers `conditioning` (docs/design.md §8): `captions` or `class_labels`; the geometry of
each sample (`original_sizes`, `crop_top_lefts`, `target_sizes`, `flips`: `data.GEOMETRY_KEYS`), which
micro-conditioning reads; and with --cache_text_embeddings, `text_embeddings`: what `encode_text`
returned for each caption, read from disk (`TextFamilyAdapter.text_embeddings` hides the difference).
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch import nn

from ..config.run import ModelConfig, RunConfig, TrainingConfig
from ..terms.registry import check_requirements
from ..utils.errors import ConfigError
from .vae import load_separate_vae, vae_dtype


@dataclass
class ModelOutput:
    model_pred: torch.Tensor  # (B, C, H, W): what the scheduler's prediction type asks for
    variance: torch.Tensor | None = None  # (B, C, H, W): learned-sigma channels, never fed to the structure term


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a batch of pixels or of cached latents."""
    key = "pixel_values" if "pixel_values" in batch else "latent_mean"
    return batch[key].shape[0]


def refuse_options(*rows: tuple[bool, str, str, str]) -> None:
    """A family's own refusals: ConfigError(field, why, fix) for the first (refused, field, why, fix) row that holds."""
    for refused, field, why, fix in rows:
        if refused:
            raise ConfigError(field, why, fix)


# -- what a family can declare ---------------------------------------------------------------------------------------
# The generic reason a family lacks a capability that a loss term requires (a family may word its own in
# `capability_gaps`); the options' refusals carry theirs in REQUIREMENTS.
GAPS: dict[str, str] = {
    "class_labels": "{name} is {conditioning} and has no class labels",
    "class_label_blocks": "{name} has no class-conditional DiT-style transformer whose first blocks form an encoder",
    "block_hidden_states": "{name}'s adapter exposes no per-block hidden states (feature_blocks)",
}

CAPABILITIES: dict[str, str] = {
    "class_labels": "class-conditional: class ids condition the denoiser (--validation_class_labels, "
                    "--disc_class_conditional)",
    "text": "text-conditioned through text.TextFamilyAdapter: captions, --validation_prompts, the text cache "
            "(--cache_text_embeddings) and DreamBooth's options (--instance_prompt, --caption_prefix, "
            "--with_prior_preservation)",
    "ddpm": "trains with the DDPM process (diffusion.process.DDPMProcess): --snr_gamma",
    "flow_matching": "trains with flow matching (diffusion.process.FlowMatchProcess): --weighting_scheme, "
                     "--precondition_outputs",
    "guidance_embedding": "has guidance-distilled denoisers (Flux.1-dev): --guidance_scale",
    "learned_sigma": "the denoiser may predict a variance in its second half of output channels (DiT's learned "
                     "sigma): `FamilyAdapter.learned_sigma`, the VLB term (--learned_sigma_loss)",
    "aspect_ratio_buckets": "trains on non-square images: --aspect_ratio_buckets (`aspect_ratio_bucket_multiple`)",
    "pos_embed_transfer": "rebuilds a fixed positional embedding for another --resolution: --pos_embed_transfer",
    "difffit": "has the BasicTransformerBlock branches DiffFit scales (tuners/difffit.py): --trainable difffit",
    "kohya_lora": "a LoRA run can also write kohya's file (tuners/kohya.py): --lora_export_format kohya / both",
    "text_encoder_lora": "a LoRA run can train a LoRA on the CLIP text encoder(s) too, saved in its LoRA files and "
                         "merged into a merged export: --train_text_encoder",
    "stock_lora_loader": "the pipeline's own `load_lora_weights` reads the diffusers-format LoRA file "
                         "(`pipeline_class`): a LoRA run writes the file alone (no merged pipeline unless "
                         "--export_merged)",
    "block_hidden_states": "the denoiser's blocks (`feature_blocks`) expose hidden states on its token grid: REPA",
    "class_label_blocks": "a class-conditional DiT-style transformer whose first blocks form an encoder: SD-DiT",
}


def _given(value: Any) -> bool:
    """An optional option is asked for: set (not None) and not a switched-off flag."""
    return value is not None and value is not False


@dataclass(frozen=True)
class Requirement:
    """An option that only a family declaring `capability` honours: refused where `when(<section>.<field>)` holds
    and the family does not declare it. `why` is formatted with `name` (the family's display name), `conditioning`
    and `process` (what the family declares, in words) and `value` (the option's); a family may word it more
    precisely for itself (`FamilyAdapter.capability_gaps`, by capability)."""
    section: str  # RunConfig attribute: "model", "data", ...
    field: str  # the option: the flag and YAML key named in the error
    capability: str
    why: str
    fix: str
    when: Callable[[Any], bool] = _given


# Every option some family refuses, in the order the checks run; the first violated row is the error. The term rows
# (--sddit_weight, --repa_weight) are the terms' own requirements (terms/), not this table's.
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("model", "lora_export_format", "kohya_lora",
                "kohya LoRA files exist for Stable Diffusion 1.x/2.x and SDXL UNets, not for {name}",
                "drop --lora_export_format (the diffusers-format file is written)",
                when=lambda value: value in ("kohya", "both")),
    Requirement("model", "train_text_encoder", "text_encoder_lora",
                "{name} is {conditioning}; text-encoder LoRA is wired for the CLIP text encoders of Stable Diffusion "
                "1.x/2.x and SDXL only", "drop --train_text_encoder", when=bool),
    Requirement("training", "validation_class_labels", "class_labels",
                "{name} is {conditioning} and takes no class ids",
                "drop --validation_class_labels (a text family's grid rows: --validation_prompts)"),
    Requirement("training", "validation_prompts", "text", "{name} is {conditioning} and takes no prompts",
                "drop --validation_prompts (a class-conditional family's grid rows: --validation_class_labels)"),
    Requirement("data", "cache_text_embeddings", "text", "{name} is {conditioning} and has no text encoder",
                "drop --cache_text_embeddings"),
    Requirement("dreambooth", "with_prior_preservation", "text",
                "needs a text-to-image pipeline and {name} is {conditioning} and takes no prompts",
                "drop --with_prior_preservation", when=bool),
    Requirement("data", "instance_prompt", "text",
                "needs a text-to-image pipeline and {name} is {conditioning} and takes no prompts",
                "drop --instance_prompt", when=bool),
    Requirement("data", "caption_prefix", "text",
                "needs a text-to-image pipeline and {name} is {conditioning} and takes no prompts",
                "drop --caption_prefix", when=bool),
    Requirement("model", "pos_embed_transfer", "pos_embed_transfer",
                "{name} has no fixed positional embedding to rebuild at another size",
                "drop --pos_embed_transfer (--resolution alone sets the training size)"),
    Requirement("training", "snr_gamma", "ddpm",
                "min-SNR weighting is defined for the DDPM targets and {name} trains with {process}",
                "drop --snr_gamma (flow matching weights with --weighting_scheme)"),
    Requirement("model", "trainable", "difffit",
                "DiffFit scales the branches of diffusers' BasicTransformerBlocks (DiT, Stable Diffusion, PixArt), "
                "which {name} has none of", "use --trainable full or lora", when=lambda value: value == "difffit"),
    Requirement("data", "aspect_ratio_buckets", "aspect_ratio_buckets", "{name} trains on square images only",
                "drop --aspect_ratio_buckets"),
    Requirement("model", "guidance_scale", "guidance_embedding",
                "is the guidance embedding's value of guidance-distilled models (Flux.1-dev) and {name} has none",
                "drop --guidance_scale (validation grids: --validation_guidance_scale)"),
    Requirement("flow_matching", "weighting_scheme", "flow_matching",
                "{value} is a flow-matching option and {name} trains with {process}",
                "drop --weighting_scheme (DDPM: --snr_gamma)", when=lambda value: value != "none"),
    Requirement("flow_matching", "precondition_outputs", "flow_matching",
                "is a flow-matching option and {name} trains with {process}",
                "drop --precondition_outputs (DDPM: the scheduler's prediction_type sets the target)"),
)


def save_with_pipeline_writer(pipeline_class: Any, output_dir: Path, lora_state_dict: dict[str, torch.Tensor],
                              adapter_metadata: dict[str, Any]) -> dict[str, str]:
    """A transformer LoRA written by the pipeline class's own `save_lora_weights` (peft keys under `transformer.`, the
    LoRA config in the metadata; Flux, Qwen-Image), to a temporary name and moved into place."""
    from ..tuners.lora import LORA_WEIGHT_NAME

    path = Path(output_dir) / LORA_WEIGHT_NAME
    tmp = path.with_name(f".tmp-{path.name}")
    pipeline_class.save_lora_weights(str(output_dir), transformer_lora_layers=lora_state_dict, weight_name=tmp.name,
                                     transformer_lora_adapter_metadata=adapter_metadata)
    os.replace(tmp, path)
    return {"diffusers": path.name}

class FamilyAdapter(ABC):
    family: str  # model-card tag, e.g. "dit"
    display_name: str = ""  # the family in messages, e.g. "Stable Diffusion XL"
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name`s this adapter accepts
    pipeline_class: type[DiffusionPipeline] | None = None  # "stock_lora_loader": the class whose loader reads our file
    denoiser_name: str  # pipeline component that trains, e.g. "transformer"
    lora_target_modules: tuple[str, ...]  # default LoRA targets (module names or name suffixes)
    load_kwargs: dict[str, Any] = {}  # passed to DiffusionPipeline.from_pretrained, e.g. components to skip
    # What the family can do, names from CAPABILITIES: each option of REQUIREMENTS needs its capability declared here.
    capabilities: frozenset[str] = frozenset()
    # A family's own wording of why it lacks a capability (capability -> why; "{name}", "{conditioning}", "{process}"
    # from `describe`): used by every refusal of an option (`check_capabilities`) or a loss term
    # (terms/registry.check_requirements: a term's `requires`) that needs it.
    capability_gaps: dict[str, str] = {}
    vae_fp32_under_bf16: bool = False  # the family's script keeps the VAE fp32 under bf16 too (vae.vae_dtype)
    hidden_output_index: int = 0  # which element of a feature block's tuple output is the image's hidden states
    resolution: int | None = None  # the run's image size (set_resolution): validation grids sample at it

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.capabilities) - set(CAPABILITIES)
        if unknown:  # a typo would silently refuse the option it meant to allow
            raise TypeError(f"{cls.__name__}.capabilities: unknown {sorted(unknown)}; known: {sorted(CAPABILITIES)}")

    def __init__(self, pipeline: DiffusionPipeline, config: ModelConfig) -> None:
        self.pipeline = pipeline
        self.config = config
        self.vae = pipeline.vae
        self.released_text_encoders: dict[str, type] = {}  # component name -> class, freed after caching (text.py)

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def split_output(self, out: torch.Tensor) -> ModelOutput:
        """The denoiser's raw output as a ModelOutput: with learned sigma, its variance channels split off."""
        if self.learned_sigma:
            model_pred, variance = out.split(self.latent_channels, dim=1)
            return ModelOutput(model_pred, variance)
        return ModelOutput(out)

    @property
    def learned_sigma(self) -> bool:
        """Whether this denoiser predicts a variance too (twice the latent channels out): only where declared."""
        return "learned_sigma" in self.capabilities and \
            self.denoiser.config.out_channels == 2 * self.latent_channels

    @property
    def stock_lora_loader(self) -> bool:
        """Whether the pipeline class's own `load_lora_weights` reads the diffusers-format LoRA file: then a LoRA run's
        output is the LoRA file(s) alone (no merged pipeline unless --export_merged), sampled through that loader."""
        return "stock_lora_loader" in self.capabilities

    # -- what the family honours, checked before any weights load --------------------------------------------------
    @classmethod
    def lacks(cls, capability: str) -> str:
        """Why this family lacks `capability`, in one clause: its own `capability_gaps` wording, else the generic one
        of `GAPS` (a loss term's refusal, terms/registry.capability_gap, reads it too)."""
        reason = cls.capability_gaps.get(capability) or GAPS.get(capability)
        words = cls.describe()
        return reason.format(**words) if reason else f"the {words['name']} family does not declare {capability!r}"

    @classmethod
    def describe(cls) -> dict[str, str]:
        """The family in words for `REQUIREMENTS`' messages: its name, conditioning and noise process as declared."""
        caps = cls.capabilities
        kinds = [kind for cap, kind in (("text", "text-conditioned"), ("class_labels", "class-conditional"))
                 if cap in caps]
        processes = [p for cap, p in (("ddpm", "the DDPM process"), ("flow_matching", "flow matching")) if cap in caps]
        return {"name": cls.display_name or cls.family,
                "conditioning": " and ".join(kinds) or "unconditional",
                "process": " or ".join(processes) or "neither the DDPM process nor flow matching"}

    @classmethod
    def check_capabilities(cls, config: RunConfig) -> None:
        """ConfigError for the first row of `REQUIREMENTS` whose option the config asks for and whose capability this
        family does not declare: the option, why (the family's `capability_gaps` or the row's), the fix."""
        for row in REQUIREMENTS:
            value = getattr(getattr(config, row.section), row.field)
            if row.capability not in cls.capabilities and row.when(value):
                why = cls.capability_gaps.get(row.capability) or row.why
                raise ConfigError(row.field, why.format(**cls.describe(), value=value), row.fix)

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        """Raise ConfigError for options this family cannot honour; runs before any weights load. The generic
        `check_capabilities` first; a family adds what no capability expresses (DiT: --pos_embed_transfer
        interpolate) after calling this. Then each loss term's requirements (terms/registry.check_requirements)."""
        cls.check_capabilities(config)
        check_requirements(config, cls)  # the loss terms this family cannot feed

    @classmethod
    def lora_formats(cls, model: ModelConfig) -> tuple[str, ...]:
        """The LoRA files a LoRA run writes ("diffusers", "kohya"): --lora_export_format, by default both where the
        family has the kohya format (ComfyUI and A1111 cannot read diffusers' SD/SDXL file), else diffusers."""
        if model.lora_type in ("loha", "lokr"):  # no stock loader reads them: the merged pipeline only
            return ()
        chosen = model.lora_export_format or ("both" if "kohya_lora" in cls.capabilities and model.lora_type == "lora"
                                              else "diffusers")
        return ("diffusers", "kohya") if chosen == "both" else (chosen,)

    @classmethod
    def exports_pipeline(cls, model: ModelConfig) -> bool:
        """Whether the run writes the full pipeline: full and DiffFit runs always; LoRA runs of a family without a
        stock LoRA loader too (the merged pipeline is their plain way to use the LoRA); others with --export_merged."""
        return (not model.use_lora or "stock_lora_loader" not in cls.capabilities or model.export_merged
                or not cls.lora_formats(model))

    def check_data(self, data: Any) -> None:
        """Raise if the data (a `data.TrainData`) cannot train this model; may remember validation defaults."""

    def validation_conditions(self, training: TrainingConfig) -> list | None:
        """The rows of a validation grid (class ids, prompts), as `sample_grid` takes them."""
        return None

    def default_resolution(self) -> int:
        """The base's native image size: the denoiser's `sample_size` latents times the VAE factor."""
        return self.denoiser.config.sample_size * self.vae_scale_factor

    @property
    def latent_patch_size(self) -> int:
        """Latents per image-token side: the transformer's patch size (DiT, PixArt, SD3), 1 for a UNet; a family
        that packs latents itself says so (Flux: 2). Image sides are multiples of the VAE factor times it
        (`patch_multiple`), and a dynamic timestep shift counts tokens with it."""
        return getattr(self.denoiser.config, "patch_size", None) or 1

    @property
    def patch_multiple(self) -> int:
        """Pixels per image-token side: image sides must be multiples of it."""
        return self.vae_scale_factor * self.latent_patch_size

    def check_resolution(self, resolution: int) -> None:
        """Raise ConfigError if the model cannot take images of this size (a family with more limits adds them)."""
        m, p = self.patch_multiple, self.latent_patch_size
        if resolution % m:
            made_of = f"VAE factor {self.vae_scale_factor} x patch size {p}" if p > 1 else "the VAE factor"
            raise ConfigError("resolution", f"{resolution} is not divisible by {m} ({made_of})",
                              f"use a multiple of {m}, e.g. {self.default_resolution()}")

    def set_resolution(self, resolution: int) -> None:
        """Check `resolution` and make the denoiser (and each copy `load_component` makes of it) train and export at
        it; a family whose denoiser does not depend on the image size only checks and records it."""
        self.check_resolution(resolution)
        self.resolution = resolution

    def sample_resolution(self) -> int:
        """The size validation grids sample at: the run's, else the base's native one (a pipeline's own default
        may differ, e.g. FluxPipeline's 1024 px whatever the run trained)."""
        return self.resolution or self.default_resolution()

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
        """Sides of aspect-ratio buckets are multiples of this (in pixels): a family declaring "aspect_ratio_buckets"
        says which (the others never get here: `check_capabilities` refused --aspect_ratio_buckets)."""
        raise NotImplementedError(f"{type(self).__name__} has no aspect-ratio bucket multiple")

    @abstractmethod
    def conditioning(self, batch: dict[str, Any], device: torch.device, weight_dtype: torch.dtype,
                     drop: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Model inputs besides latents and timesteps; `drop` applies classifier-free-guidance dropout."""

    def text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders in memory, by component name: none here (text families: text.TextFamilyAdapter)."""
        return {}

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


    # -- LoRA files through the stock pipeline's loader ("stock_lora_loader": SD, SDXL, SD3, Flux) -----------------
    def lora_pipeline(self, output_dir: Path, weight_name: str) -> DiffusionPipeline:
        """The base pipeline (a fresh base denoiser beside the frozen components) with the LoRA file `weight_name` of
        `output_dir` applied by the pipeline's own `load_lora_weights`: what a user of the file samples. Raises unless
        every LoRA tensor of the file sits in the denoiser or a text encoder (a loader may inject a module and leave
        the file's tensor for it unread, with only a warning)."""
        from collections import Counter

        from diffusers.utils import logging as diffusers_logging
        from safetensors.torch import load_file

        if not self.stock_lora_loader:
            raise NotImplementedError(f"{type(self).__name__} declares no stock LoRA loader")
        pipeline = self.export_pipeline(self.load_component(self.denoiser_name))
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder" and the like: checked below
        try:
            pipeline.load_lora_weights(str(output_dir), weight_name=weight_name)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        in_file = {k: v for k, v in load_file(str(Path(output_dir) / weight_name)).items() if not k.endswith(".alpha")}
        dtype = next(iter(in_file.values())).dtype

        def fingerprints(tensors) -> Counter:  # each tensor's bytes in the file's dtype: a multiset to compare
            return Counter(t.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes()
                           for t in tensors)

        modules = [getattr(pipeline, self.denoiser_name), *(getattr(pipeline, name) for name in
                                                             getattr(self, "text_encoder_names", ()))]
        loaded = [p for module in modules if module is not None for name, p in module.named_parameters()
                  if ".lora_A." in name or ".lora_B." in name or ".lora_magnitude_vector." in name]  # DoRA's too
        missing = fingerprints(in_file.values()) - fingerprints(loaded)
        if missing:
            raise RuntimeError(f"{weight_name}: diffusers' load_lora_weights left {sum(missing.values())} of its "
                               f"{len(in_file)} LoRA tensors unused")
        return pipeline

    def stock_lora_usage(self, base: str, repo: str, weight_name: str, call: str) -> str:
        """Model-card code for a family with a stock LoRA loader: the base pipeline (with the run's separate VAE, as
        training and samples used it) and `load_lora_weights`."""
        name = self.pipeline_class.__name__
        imports, vae_line, vae_arg = name, "", ""
        if self.config.pretrained_vae_model_name_or_path:
            from .vae import separate_vae_source

            source, kwargs = separate_vae_source(self.config)
            vae_cls = type(self.vae).__name__
            options = "".join(f", {k}={kwargs[k]!r}" for k in ("subfolder", "revision") if kwargs.get(k))
            imports, vae_arg = f"{vae_cls}, {name}", ", vae=vae"
            vae_line = f'vae = {vae_cls}.from_pretrained("{source}"{options}, dtype=dtype)\n'
        return f"""import torch
from diffusers import {imports}

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
{vae_line}pipe = {name}.from_pretrained("{base}"{self.base_load_options()}{vae_arg}, dtype=dtype).to(device)
pipe.load_lora_weights("{repo}", weight_name="{weight_name}")
{call}
image.save("sample.png")"""

    def lora_usage(self, base: str, repo: str, weight_name: str, call: str) -> str:
        """Model-card code that applies the saved LoRA file to the base model and makes an image: the stock loader's
        (`stock_lora_usage`) where declared, else a subclass with diffusers' PeftAdapterMixin reads it."""
        if self.stock_lora_loader:
            return self.stock_lora_usage(base, repo, weight_name, call)
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

