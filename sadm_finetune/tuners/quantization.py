"""LoRA on a quantized base (--quantize_base, --quantize_text_encoders): the frozen weights load quantized through
diffusers' and transformers' own quantization configs, handed to `DiffusionPipeline.from_pretrained` as one
`PipelineQuantizationConfig` (what diffusers' Flux QLoRA example does for the transformer).

Backends (--quantize_backend; default: bitsandbytes where CUDA is visible, torchao elsewhere):
- bitsandbytes: `BitsAndBytesConfig` (int8: LLM.int8 `load_in_8bit`; nf4: `load_in_4bit`, `bnb_4bit_quant_type="nf4"`,
  compute dtype = the run's weight dtype). diffusers' bitsandbytes quantizer needs a GPU, so it is refused without one.
- torchao: `TorchAoConfig(Int8WeightOnlyConfig())`: int8 weight-only, per output channel, runs on a CPU; it is the
  backend the tests train with here. nf4 has no torchao counterpart here (refused).

What trains on top: peft's LoRA layers for quantized bases (`peft.tuners.lora.bnb.Linear8bitLt/Linear4bit`,
`peft.tuners.lora.torchao.TorchaoLoraLinear`), which `inject_adapter_in_model` picks from the layer's weight type,
the LoRA weights fp32 as in every LoRA run. The LoRA file has the same keys and format as one trained on the full-
precision base; the export applies it to (or merges it into) the base re-read at full precision from its source
(docs/design.md, "LoRA on a quantized base")."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config.run import ModelConfig
from ..utils.errors import ConfigError

QUANT_LEVELS = ("none", "int8", "nf4")
BACKENDS = ("bitsandbytes", "torchao")


def backend_for(model: ModelConfig) -> str:
    """The backend this run quantizes with: --quantize_backend, else bitsandbytes on CUDA and torchao elsewhere
    (nf4 exists in bitsandbytes only)."""
    if model.quantize_backend is not None:
        return model.quantize_backend
    if model.quantize_base == "nf4" or model.quantize_text_encoders == "nf4":
        return "bitsandbytes"
    return "bitsandbytes" if torch.cuda.is_available() else "torchao"


def wants_quantization(model: ModelConfig) -> bool:
    return model.quantize_base != "none" or model.quantize_text_encoders != "none"


def check_environment(model: ModelConfig) -> None:
    """One-line refusals for what this machine cannot run, before any weights load."""
    if not wants_quantization(model):
        return
    field = "quantize_base" if model.quantize_base != "none" else "quantize_text_encoders"
    backend = backend_for(model)
    if backend == "bitsandbytes":
        if not torch.cuda.is_available():
            raise ConfigError(field, "bitsandbytes quantization (diffusers' BitsAndBytesConfig) needs a CUDA GPU and "
                              "none is visible", "use --quantize_base int8 with --quantize_backend torchao (runs on a "
                              "CPU), or train on a GPU")
        _require("bitsandbytes", field, "bitsandbytes")
    else:
        _require("torchao", field, "torchao")


def _require(module: str, field: str, package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(field, f"the {package} backend is not installed", "pip install 'sadm-finetune[quant]'")


def _quantization_config(library: str, level: str, backend: str, compute_dtype: torch.dtype):
    """The quantization config of `library` ("diffusers" for the denoiser, "transformers" for the text encoders):
    both export `BitsAndBytesConfig` and `TorchAoConfig` with the same arguments."""
    import importlib

    lib = importlib.import_module(library)
    if backend == "bitsandbytes":
        if level == "int8":
            return lib.BitsAndBytesConfig(load_in_8bit=True)
        return lib.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=compute_dtype)
    from torchao.quantization import Int8WeightOnlyConfig

    return lib.TorchAoConfig(Int8WeightOnlyConfig())


def quantized_load_kwargs(model: ModelConfig, denoiser_name: str, text_encoder_names: tuple[str, ...],
                          present: set[str], weight_dtype: torch.dtype | None) -> dict[str, Any]:
    """`from_pretrained` kwargs that load the quantized components: the `PipelineQuantizationConfig` and a dtype map
    (the quantized components' unquantized layers in the run's weight dtype, everything else fp32 as in any run).
    Empty when nothing is quantized (the load is then the plain one, bit for bit). `present`: the components the
    pipeline holds (a text encoder saved as null is not quantized)."""
    if not wants_quantization(model):
        return {}
    from diffusers import PipelineQuantizationConfig

    backend = backend_for(model)
    dtype = weight_dtype or torch.float32
    mapping: dict[str, Any] = {}
    if model.quantize_base != "none":
        mapping[denoiser_name] = _quantization_config("diffusers", model.quantize_base, backend, dtype)
    if model.quantize_text_encoders != "none":
        for name in text_encoder_names:
            if name in present:
                mapping[name] = _quantization_config("transformers", model.quantize_text_encoders, backend, dtype)
    if not mapping:
        return {}
    return {"quantization_config": PipelineQuantizationConfig(quant_mapping=mapping),
            "dtype": {**{name: dtype for name in mapping}, "default": torch.float32}}


def is_quantized(module: nn.Module | None) -> bool:
    """Whether `module` was loaded quantized (diffusers' and transformers' models mark it so)."""
    return bool(getattr(module, "is_quantized", False)) or getattr(module, "hf_quantizer", None) is not None


def quantization_of(module: nn.Module | None) -> dict[str, Any] | None:
    """The quantization config `module` was loaded with (transformers' and diffusers' `quantization_config`), as a
    JSON-able dict with sorted keys; None for a module loaded at full precision."""
    if not is_quantized(module):
        return None
    import json

    quantizer = getattr(module, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None) or getattr(module.config, "quantization_config", None)
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    return json.loads(json.dumps(as_dict, sort_keys=True, default=lambda v: getattr(v, "value", str(v))))


def quantization_label(module: nn.Module | None) -> str | None:
    """`module`'s quantization in words: "int8 (bitsandbytes)", "nf4 (bitsandbytes)", "Int8WeightOnlyConfig
    (torchao)"; None for a module loaded at full precision."""
    config = quantization_of(module)
    if config is None:
        return None
    method = config.get("quant_method", "quantized")
    if method == "bitsandbytes":
        kind = "int8" if config.get("load_in_8bit") else config.get("bnb_4bit_quant_type", "4-bit")
    elif method == "torchao":
        quant_type = config.get("quant_type")
        quant_type = quant_type.get("default", quant_type) if isinstance(quant_type, dict) else quant_type
        kind = quant_type.get("_type", "quantized") if isinstance(quant_type, dict) else str(quant_type)
    else:
        kind = "quantized"
    return f"{kind} ({method})"


def quantized_weights(module: nn.Module) -> int:
    """How many of `module`'s Linear weights are quantized tensors (torchao) or bitsandbytes parameters."""
    count = 0
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        if weight is None or not isinstance(sub, nn.Linear):
            continue
        kind = type(weight).__module__
        if kind.startswith(("torchao", "bitsandbytes")):
            count += 1
    return count


class _KeepQuantizedForBackward(torch.autograd.Function):
    """`F.linear(x, W, b)` for a frozen quantized W whose backward keeps W quantized: autograd's own graph through a
    torchao weight saves the dequantized full-precision copy of W (measured on CPU: a 1024x1024 int8 layer saves a
    1024x1024 fp32 tensor), so a LoRA step would hold every base weight in fp32 again. Here only the input's
    gradient flows (W and b are frozen) and W is dequantized in the backward, one layer at a time, as bitsandbytes'
    own MatMul8bitLt / MatMul4Bit do."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight, ctx.x_dtype = weight, x.dtype  # the quantized tensor itself, not a copy
        with torch.no_grad():
            return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.weight.dequantize().to(grad.dtype)
        return (grad @ weight).to(ctx.x_dtype), None, None


def _frozen_quantized_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or not x.requires_grad or self.weight.requires_grad:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return _KeepQuantizedForBackward.apply(x, self.weight, self.bias)


def keep_quantized_for_backward(model: nn.Module) -> int:
    """Route every torchao-quantized Linear of `model` through `_KeepQuantizedForBackward`; returns how many.
    (bitsandbytes' layers already keep their weight quantized in the backward.)"""
    import types

    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and type(module.weight).__module__.startswith("torchao"):
            module.forward = types.MethodType(_frozen_quantized_forward, module)
            count += 1
    return count
