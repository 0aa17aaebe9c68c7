"""The optimizers a run can train with (--optimizer for the denoiser, --disc_optimizer for SADM's discriminator).

- `adamw`: torch's AdamW (the default; exactly what runs built before these options).
- `adamw_8bit`: bitsandbytes' AdamW8bit: 8-bit block-wise quantised moments for tensors of 4096 or more elements
  (smaller ones keep fp32 moments, bitsandbytes' `min_8bit_size`). bitsandbytes 0.50 runs it on CPU too.
- `prodigy`: prodigyopt's Prodigy, which estimates the step size `d` itself; `lr` multiplies it, so diffusers'
  training scripts run it at lr 1.0 and warn below 0.1; we do the same. Its options default as in those scripts
  (decoupled weight decay, bias correction and safeguard warm-up on; beta3 unset: sqrt(beta2)).

Every optimizer keeps all its state (Prodigy's `d` sits in its param groups) in `state_dict()`, which accelerate's
checkpoints save and resume restores.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Iterable

from ..utils.errors import ConfigError

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw_8bit", "prodigy")
_PACKAGES = {"adamw_8bit": ("bitsandbytes", "bitsandbytes"), "prodigy": ("prodigyopt", "prodigyopt")}


def check_installed(field: str, name: str) -> None:
    """ConfigError naming the pip command when the package behind optimizer `name` is missing (no import)."""
    if name in _PACKAGES:
        module, package = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(field, f"{name} needs the {package} package, which is not installed",
                              f"pip install {package} (or pip install 'sadm-finetune[optim]'), or use adamw")


def make_optimizer(name: str, params: Iterable[Any], lr: float, betas: tuple[float, float], weight_decay: float,
                   eps: float, training: Any = None, field: str = "optimizer"):
    """Optimizer `name` (one of OPTIMIZERS) over `params`. `training`: the run's TrainingConfig, whose prodigy_*
    options Prodigy reads; `field`: the option that chose it (for messages)."""
    if name == "adamw":
        import torch

        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    check_installed(field, name)
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "prodigy":
        from prodigyopt import Prodigy

        if lr <= 0.1:  # diffusers' train_dreambooth_lora_*.py warn the same way
            logger.warning(f"{field} prodigy at learning rate {lr}: Prodigy's step is lr times its own estimate d, "
                           "so lr is usually about 1.0 (diffusers' scripts warn below 0.1)")
        options: dict[str, Any] = {}
        if training is not None:
            options = dict(beta3=training.prodigy_beta3, decouple=training.prodigy_decouple,
                           use_bias_correction=training.prodigy_use_bias_correction,
                           safeguard_warmup=training.prodigy_safeguard_warmup, d_coef=training.prodigy_d_coef)
        return Prodigy(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **options)
    raise ConfigError(field, f"unknown optimizer {name!r}", f"use one of {', '.join(OPTIMIZERS)}")
