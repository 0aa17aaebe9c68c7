"""REPA's config section (`repa:` in a recipe, `config.repa`, a flag per field), registered as the term "repa"."""

from __future__ import annotations

from dataclasses import dataclass

from ...config.fields import help_field as _f
from ...utils.errors import ConfigError
from ..registry import TermConfig


@dataclass
class RepaConfig(TermConfig):
    """REPA (Yu et al. 2024): align the denoiser's hidden states at one block, through a small MLP
    projector, with a frozen vision encoder's patch features of the clean image."""

    title = "REPA"
    weight_field = "repa_weight"
    requires = frozenset({"block_hidden_states"})
    requirement = "the denoiser's per-block hidden states on its token grid"

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

    def build(self, config, adapter, process, autocast) -> list:
        if not self.enabled:
            return []
        from .term import RepaTerm

        return [RepaTerm(config, adapter, autocast)]

    def cache_companions(self, config, accelerator, adapter, data, folder) -> list:
        from .cache import feature_cache_for  # the encoder's features of every image, cached beside the latents

        return [feature_cache_for(config, accelerator, adapter, data, folder)]

    def check_model(self, config, adapter, accelerator) -> None:
        if self.enabled:
            from .term import RepaTerm

            RepaTerm.check(config, adapter, accelerator)
