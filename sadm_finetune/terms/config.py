"""Config sections of the auxiliary loss terms besides SADM (REPA, SD-DiT); a weight of 0 turns a term off.

Kept apart from config.py (the run's own sections) so each stays short; flags are derived from these
fields like every other (flags.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..utils.errors import ConfigError
from ..config.fields import help_field as _f


@dataclass
class RepaConfig:
    """REPA (Yu et al. 2024): align the denoiser's hidden states at one block, through a small MLP
    projector, with a frozen vision encoder's patch features of the clean image."""

    repa_weight: float = _f(0.0, "REPA's lambda (the paper uses 0.5); 0 turns REPA off")
    repa_encoder: str = _f("facebook/dinov2-base", "frozen vision encoder (a transformers model id or folder)")
    repa_depth: int = _f(8, "align the output of this many denoiser blocks (1-based; the paper: 8 of SiT-XL's 28)")
    repa_projector_dim: int = _f(2048, "hidden width of REPA's 3-layer MLP projector")
    repa_encoder_resolution: int = _f(224, "the encoder sees images of this size squared (same aspect)")

    def __post_init__(self) -> None:
        for name in ("repa_weight",):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"is {getattr(self, name)}, must be >= 0", f"pass --{name} 0 or more")
        for name in ("repa_depth", "repa_projector_dim", "repa_encoder_resolution"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"is {getattr(self, name)}, must be >= 1", f"pass --{name} 1 or more")

    @property
    def enabled(self) -> bool:
        return self.repa_weight > 0


@dataclass
class SDDiTConfig:
    """SD-DiT's discriminative term (Zhu et al. 2024): the first blocks as an encoder, a DINO-style loss
    between a student view at the sampled noise level and an EMA teacher view at the minimum level."""

    sddit_weight: float = _f(0.0, "the discriminative term's lambda; 0 turns SD-DiT off")
    sddit_encoder_depth: int = _f(4, "the denoiser's first this-many blocks form the encoder")
    sddit_ema_decay: float = _f(0.996, "the teacher encoder's EMA decay")
    sddit_mask_ratio: float = _f(0.0, "fraction of the student's patch tokens masked (0 = no masking)")
    sddit_loss: Literal["dino", "cosine"] = _f("dino", "DINO cross-entropy with centering and sharpening, or cosine")
    sddit_head_dim: int = _f(1024, "output width of the projection head (DINO's prototypes)")
    sddit_head_hidden_dim: int = _f(2048, "hidden width of the projection head's 3-layer MLP")
    sddit_student_temperature: float = _f(0.1, "DINO student softmax temperature")
    sddit_teacher_temperature: float = _f(0.04, "DINO teacher softmax temperature (sharpening)")
    sddit_center_momentum: float = _f(0.9, "momentum of the teacher's output centre")

    def __post_init__(self) -> None:
        if self.sddit_weight < 0:
            raise ConfigError("sddit_weight", f"is {self.sddit_weight}, must be >= 0", "pass --sddit_weight 0 or more")
        for name in ("sddit_encoder_depth", "sddit_head_dim", "sddit_head_hidden_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"is {getattr(self, name)}, must be >= 1", f"pass --{name} 1 or more")
        for name in ("sddit_ema_decay", "sddit_mask_ratio", "sddit_center_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"is {getattr(self, name)}, must be in [0, 1)", f"pass --{name} in [0, 1)")
        for name in ("sddit_student_temperature", "sddit_teacher_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"is {getattr(self, name)}, must be > 0", f"pass --{name} above 0")

    @property
    def enabled(self) -> bool:
        return self.sddit_weight > 0
