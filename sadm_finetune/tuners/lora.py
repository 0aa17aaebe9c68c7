"""LoRA on the denoiser through peft's functional API (works for models without diffusers' adapter mixin, e.g. DiT).

Adapter kinds (--lora_type): LoRA, DoRA (LoRA with peft's `use_dora`: a learned magnitude per output feature), LoHa
and LoKr (peft's LyCORIS tuners), each with optional per-module ranks and alphas (peft's `rank_pattern` /
`alpha_pattern`, saved in the file's metadata, which diffusers' loader rebuilds the config from).

Layout of a LoRA run (docs/design.md §3): the base denoiser is frozen and may sit in `weight_dtype`; the
LoRA parameters train in fp32; checkpoints hold the LoRA tensors only; the export writes the adapter weights
(`FamilyAdapter.save_lora_weights`: the diffusers format, and kohya's for SD/SDXL) and, where the family has no
stock LoRA loader or with --export_merged, merges the LoRA into a fresh copy of the base (state-dict keys identical
to the base's).
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from diffusers.training_utils import cast_training_params
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from peft.functional import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..config.run import ModelConfig
from ..utils.errors import ConfigError

ADAPTER_NAME = "default"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' own name: load_lora_weights(folder) finds it
# --train_text_encoder: CLIP's attention projections, as diffusers' train_dreambooth_lora.py / _sdxl.py adapt them
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def make_lora_config(config: ModelConfig, default_targets: tuple[str, ...]) -> PeftConfig:
    """peft's config for --lora_type: LoraConfig (use_dora for dora) or LoHaConfig / LoKrConfig, with the per-module
    rank and alpha patterns (module-name regex or suffix -> value, peft's `rank_pattern` / `alpha_pattern`)."""
    alpha = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
    targets = list(config.lora_target_modules or default_targets)
    patterns = {name: dict(value) for name, value in (("rank_pattern", config.lora_rank_pattern),
                                                       ("alpha_pattern", config.lora_alpha_pattern)) if value}
    if config.lora_type in ("loha", "lokr"):
        cls = LoHaConfig if config.lora_type == "loha" else LoKrConfig
        return cls(r=config.lora_rank, alpha=alpha, target_modules=targets, **patterns)
    if config.lora_type == "dora":
        patterns["use_dora"] = True
    return LoraConfig(r=config.lora_rank, lora_alpha=alpha, lora_dropout=config.lora_dropout, target_modules=targets,
                      **patterns)


def make_text_encoder_lora_config(config: ModelConfig, exclude: list[str] | None = None) -> LoraConfig:
    """The text encoders' LoRA (--train_text_encoder): plain LoRA on `TEXT_ENCODER_TARGETS`, rank
    --text_encoder_lora_rank (default --lora_rank), alpha --lora_alpha when given, else that rank; --lora_dropout.
    The denoiser's --lora_target_modules and rank / alpha patterns name denoiser modules and do not apply.
    `exclude`: module-name suffixes left without LoRA (peft's `exclude_modules`): those the family never reads."""
    rank = config.text_encoder_lora_rank or config.lora_rank
    alpha = config.lora_alpha if config.lora_alpha is not None else rank
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(TEXT_ENCODER_TARGETS), exclude_modules=list(exclude) if exclude else None)


def module_alphas(adapter_metadata: dict[str, Any], modules: list[str]) -> dict[str, float]:
    """Each module's alpha under a LoRA config's `alpha_pattern` (`adapter_metadata`: `lora_metadata`'s dict), matched
    as peft matches it (the first pattern that is the module name or a dotted suffix of it, as a regex), else its
    `lora_alpha`."""
    from peft.utils.other import get_pattern_key

    pattern = adapter_metadata.get("alpha_pattern") or {}
    alpha = adapter_metadata["lora_alpha"]
    return {m: float(pattern.get(get_pattern_key(list(pattern), m), alpha)) for m in modules}


def attach_lora(denoiser: nn.Module, lora_config: PeftConfig) -> nn.Module:
    """Freeze the denoiser and inject LoRA layers; only they require grad, in fp32 whatever the base dtype."""
    denoiser.requires_grad_(False)
    try:
        inject_adapter_in_model(lora_config, denoiser, adapter_name=ADAPTER_NAME)
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        targets = sorted(lora_config.target_modules)
        raise ConfigError("lora_target_modules", f"none of {targets} names a module of the {type(denoiser).__name__}",
                          "pass module names (or suffixes) such as to_q to_v") from None
    _check_patterns(denoiser, lora_config)
    cast_training_params(denoiser, dtype=torch.float32)  # fp16/bf16 masters would lose small updates
    return denoiser


def _check_patterns(denoiser: nn.Module, lora_config: PeftConfig) -> None:
    """A --lora_rank_pattern / --lora_alpha_pattern key that matches no adapted module (peft ignores it) is an error."""
    import re

    adapted = [name for name, module in denoiser.named_modules() if isinstance(module, BaseTunerLayer)]
    for field, pattern in (("lora_rank_pattern", lora_config.rank_pattern), ("lora_alpha_pattern",
                                                                              lora_config.alpha_pattern)):
        for key in pattern or {}:
            if not any(re.match(rf"(.*\.)?({key})$", name) for name in adapted):
                raise ConfigError(field, f"{key!r} matches none of the {len(adapted)} modules that get the adapter",
                                  "use a name or dotted suffix of a target module (--lora_target_modules), e.g. "
                                  "attn1.to_q")


def lora_state_dict(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors in peft's key format (`...to_q.lora_A.weight`), as detached fp32 CPU copies."""
    state = get_peft_model_state_dict(denoiser, adapter_name=ADAPTER_NAME)
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items()}


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The LoRA tensors in `dtype` (the export dtype), as new tensors when they change."""
    return {k: v.to(dtype) for k, v in state.items()}


def lora_metadata(lora_config: PeftConfig) -> dict[str, Any]:
    """The LoRA config as saved beside the weights (diffusers rebuilds the adapter from it); sets sorted,
    so the file is byte-identical across runs."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in lora_config.to_dict().items()}


def merge_lora(base: nn.Module, lora_config: PeftConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """Merge LoRA weights into `base` in place and remove the LoRA layers: the result has the base's
    modules and state-dict keys, so any stock pipeline loads it."""
    inject_adapter_in_model(lora_config, base, adapter_name=ADAPTER_NAME)
    result = set_peft_model_state_dict(base, state, adapter_name=ADAPTER_NAME)
    if result.unexpected_keys:
        raise RuntimeError(f"LoRA weights do not fit the base model: {result.unexpected_keys[:3]}")
    for name, module in list(base.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent_name) if parent_name else base, child, module.get_base_layer())
    if hasattr(base, "peft_config"):
        del base.peft_config
    return base


class _TrainableOnly:
    """Stands in for the denoiser when accelerate saves or loads a checkpoint: only its trainable
    (LoRA) tensors, so a checkpoint holds megabytes, not the frozen base."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _names(self) -> set[str]:
        return {name for name, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, torch.Tensor]:
        names = self._names()
        return {k: v for k, v in self.model.state_dict().items() if k in names}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any:
        names = self._names()
        missing, unexpected = sorted(names - set(state_dict)), sorted(set(state_dict) - names)
        if strict and (missing or unexpected):
            raise RuntimeError(f"checkpoint does not hold this run's LoRA weights (missing {missing[:3]}, unexpected "
                               f"{unexpected[:3]}); resume with the same --lora_* options")
        self.model.load_state_dict({k: v for k, v in state_dict.items() if k in names}, strict=False)
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


def register_lora_checkpointing(accelerator: Accelerator, denoiser: nn.Module, *others: nn.Module) -> None:
    """Make `save_state`/`load_state` write and read only the LoRA tensors of the prepared `denoiser` (and of the
    prepared text encoders in `others`, with --train_text_encoder: each its own `model_<i>.safetensors`)."""
    adapted = [denoiser, *others]

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models):
            if any(model is m for m in adapted):
                weights[i] = _TrainableOnly(model).state_dict()

    def load_hook(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            if any(model is m for m in adapted):
                models[i] = _TrainableOnly(model)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
