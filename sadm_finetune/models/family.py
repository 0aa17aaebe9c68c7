"""The seam that keeps the training loop generic: one adapter per pipeline family.

An adapter turns a data batch into the denoiser's conditioning, calls the denoiser and splits its
output, and rebuilds the family's stock pipeline for export and sampling. A new family (SDXL,
PixArt, SD3) is one new subclass registered in `FAMILIES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch import nn

from ..config import ModelConfig


@dataclass
class ModelOutput:
    model_pred: torch.Tensor  # (B, C, H, W): what the scheduler's prediction type asks for
    variance: torch.Tensor | None = None  # (B, C, H, W): learned-sigma channels, never fed to the structure term


class FamilyAdapter(ABC):
    family: str  # model-card tag, e.g. "dit"
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name`s this adapter accepts
    denoiser_name: str  # pipeline component that trains, e.g. "transformer"

    def __init__(self, pipeline: DiffusionPipeline, config: ModelConfig) -> None:
        self.pipeline = pipeline
        self.config = config
        self.vae = pipeline.vae

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @abstractmethod
    def default_resolution(self) -> int: ...

    @abstractmethod
    def check_resolution(self, resolution: int) -> None:
        """Raise ConfigError if the model cannot take images of this size."""

    @abstractmethod
    def frozen_modules(self) -> list[nn.Module]:
        """Modules that never train (moved to the device in weight_dtype)."""

    @abstractmethod
    def prepare_training(self) -> None:
        """Put the denoiser into its training configuration (e.g. conditioning dropout handled by us)."""

    @abstractmethod
    def conditioning(self, batch: dict[str, Any], device: torch.device, weight_dtype: torch.dtype,
                     drop: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Model inputs besides latents and timesteps; `drop` applies classifier-free-guidance dropout."""

    @abstractmethod
    def predict(self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> ModelOutput: ...

    def disc_class_labels(self, conditioning: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return conditioning.get("class_labels")

    @abstractmethod
    def export_pipeline(self, denoiser: nn.Module) -> DiffusionPipeline:
        """A stock pipeline holding `denoiser` (an unwrapped module) and the frozen components."""

    @abstractmethod
    def sample_grid(self, pipeline: DiffusionPipeline, num_per_row: int, num_inference_steps: int,
                    guidance_scale: float, seed: int, class_labels: list[int] | None) -> np.ndarray:
        """(rows, cols, H, W, 3) float images in [0, 1] for a validation grid."""

    def reload_frozen_fp32(self) -> None:
        """Reload the frozen components from the source, undoing a cast to a half-precision weight_dtype,
        so that the export carries the base weights bit for bit."""
        c = self.config
        for module in self.frozen_modules():
            name = next(k for k, v in self.pipeline.components.items() if v is module)
            fresh = type(module).from_pretrained(c.pretrained_model_name_or_path, subfolder=name, revision=c.revision,
                                                 variant=c.variant, use_safetensors=not c.allow_pickle_weights or None)
            setattr(self.pipeline, name, fresh)
            if name == "vae":
                self.vae = fresh

    def card_tags(self) -> list[str]:
        return [self.family]
