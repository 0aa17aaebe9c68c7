"""SD-DiT's config section (`sddit:` in a recipe, `config.sddit`, a flag per field), registered as the term "sddit"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...config.fields import help_field as _f
from ...utils.errors import ConfigError
from ..registry import TermConfig


@dataclass
class SDDiTConfig(TermConfig):
    """SD-DiT's discriminative term (Zhu et al. 2024): the first blocks as an encoder, a DINO-style loss
    between a student view at the sampled noise level and an EMA teacher view at the minimum level."""

    title = "SD-DiT"
    weight_field = "sddit_weight"
    requires = frozenset({"class_label_blocks"})
    requirement = "a DiT-style transformer whose first blocks, conditioned on class labels, form its encoder"
    requirement_fix = "drop --sddit_weight or fine-tune a DiT pipeline"

    sddit_weight: float = _f(0.0, "the discriminative term's lambda; 0 turns SD-DiT off")
    sddit_encoder_depth: int = _f(4, "the denoiser's first this-many blocks form the encoder")
    sddit_ema_decay: float = _f(0.996, "the teacher encoder's EMA decay")
    sddit_mask_ratio: float = _f(0.0, "fraction of the student's patch tokens masked (0 = no masking)")
    sddit_every: int = _f(1, "the term on every this-many-th update only, at lambda x this many (lazy "
                             "regularisation, as StyleGAN2's R1): its teacher forward and head run that much less "
                             "often; the teacher's EMA still follows every update")
    sddit_t_min: int = _f(0, "the term on samples whose timestep is at least this only (a noise band; samples outside "
                             "it carry no SD-DiT loss, so the batch mean is lambda x the band's share)")
    sddit_t_max: int | None = _f(None, "the term on samples whose timestep is below this only (None: no "
                                       "upper bound); with sddit_t_min a band")
    sddit_band_scope: Literal["loss", "encoder"] = _f(
        "loss", "what a noise band confines: 'loss' (samples outside it carry no SD-DiT loss, so neither the head nor "
                "the denoiser learns from them) or 'encoder' (the head learns from every sample, only the denoiser's "
                "push is confined to the band)")
    sddit_loss: Literal["dino", "cosine"] = _f("dino", "DINO cross-entropy with centering and sharpening, or cosine")
    sddit_head_dim: int = _f(1024, "output width of the projection head (DINO's prototypes)")
    sddit_head_hidden_dim: int = _f(2048, "hidden width of the projection head's 3-layer MLP")
    sddit_student_temperature: float = _f(0.1, "DINO student softmax temperature")
    sddit_teacher_temperature: float = _f(0.04, "DINO teacher softmax temperature (sharpening)")
    sddit_center_momentum: float = _f(0.9, "momentum of the teacher's output centre")

    @property
    def has_band(self) -> bool:
        """Whether a noise band is set (either bound); without one the term acts on every timestep."""
        return self.sddit_t_min > 0 or self.sddit_t_max is not None

    def __post_init__(self) -> None:
        if self.sddit_weight < 0:
            raise ConfigError("sddit_weight", f"is {self.sddit_weight}, must be >= 0", "pass --sddit_weight 0 or more")
        for name in ("sddit_encoder_depth", "sddit_head_dim", "sddit_head_hidden_dim", "sddit_every"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"is {getattr(self, name)}, must be >= 1", f"pass --{name} 1 or more")
        if self.sddit_t_min < 0:
            raise ConfigError("sddit_t_min", f"is {self.sddit_t_min}, must be >= 0", "pass --sddit_t_min 0 or more")
        if self.sddit_t_max is not None and self.sddit_t_max <= self.sddit_t_min:
            raise ConfigError("sddit_t_max", f"is {self.sddit_t_max}, must be above sddit_t_min ({self.sddit_t_min})",
                              "pass a --sddit_t_max above --sddit_t_min, or leave it unset")
        if self.sddit_band_scope != "loss" and not self.has_band:
            raise ConfigError("sddit_band_scope", f"is {self.sddit_band_scope!r}, but no noise band is set",
                              "set --sddit_t_min or --sddit_t_max, or drop --sddit_band_scope")
        for name in ("sddit_ema_decay", "sddit_mask_ratio", "sddit_center_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"is {getattr(self, name)}, must be in [0, 1)", f"pass --{name} in [0, 1)")
        for name in ("sddit_student_temperature", "sddit_teacher_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"is {getattr(self, name)}, must be > 0", f"pass --{name} above 0")

    def build(self, config, adapter, process, autocast) -> list:
        if not self.enabled:
            return []
        from .term import SDDiTTerm

        return [SDDiTTerm(config, adapter, process, autocast)]
