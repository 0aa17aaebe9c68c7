"""Load a pretrained pipeline (Hub id or folder) and pick its family adapter; clear errors first. Also where the
base lives on this machine and the dtype its weights are stored in (read without loading them)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config.run import ModelConfig
from ..utils.errors import InputError, first_line
from .dit import DiTAdapter
from .base import FamilyAdapter
from .flux import FluxAdapter
from .model_index import read_pipeline_index
from .pixart import PixArtAdapter
from .qwen_image import QwenImageAdapter
from .sd import StableDiffusionAdapter
from .sd3 import StableDiffusion3Adapter
from .sdxl import StableDiffusionXLAdapter
from .vae import load_separate_vae

FAMILIES: tuple[type[FamilyAdapter], ...] = (DiTAdapter, StableDiffusionAdapter, StableDiffusionXLAdapter,
                                              PixArtAdapter, StableDiffusion3Adapter, FluxAdapter, QwenImageAdapter)


def _supported() -> str:
    return ", ".join(c for family in FAMILIES for c in family.pipeline_classes)


def _adapter_class(class_name: str, source: str) -> type[FamilyAdapter]:
    for family in FAMILIES:
        if class_name in family.pipeline_classes:
            return family
    raise InputError(
        f"pretrained_model_name_or_path: {source} is a {class_name}, which this toolkit cannot fine-tune; "
        f"use one of: {_supported()}"
    )


def saved_as_null(index: dict) -> dict[str, None]:
    """Components the pipeline was saved without (`[null, null]` in model_index.json, e.g. SD3's T5 dropped):
    passed as None, as `from_pretrained` wants them named."""
    return {name: None for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and value and value[0] is None}


def family_class(config: ModelConfig) -> type[FamilyAdapter]:
    """The adapter class for the pretrained pipeline, from its model_index.json alone (no weights)."""
    return _adapter_class(read_pipeline_index(config)["_class_name"], config.pretrained_model_name_or_path)


def load_family(config: ModelConfig, weight_dtype=None) -> FamilyAdapter:
    """Load the pipeline in fp32 (safetensors only unless allowed) and wrap it in its family adapter. With
    --quantize_base / --quantize_text_encoders those components load quantized (tuners/quantization.py), their
    unquantized layers in `weight_dtype` (the run's frozen dtype; fp32 when None)."""
    from diffusers import DiffusionPipeline

    from ..tuners.quantization import check_environment, quantized_load_kwargs

    source = config.pretrained_model_name_or_path
    index = read_pipeline_index(config)
    adapter_class = _adapter_class(index["_class_name"], source)
    check_environment(config)
    null = saved_as_null(index)
    present = {name for name in index if not name.startswith("_") and name not in null}
    encoders = getattr(adapter_class, "text_encoder_names", ())  # text families only (families/text.py)
    quantized = quantized_load_kwargs(config, adapter_class.denoiser_name, encoders, present, weight_dtype)
    try:
        pipeline = DiffusionPipeline.from_pretrained(
            source,
            revision=config.revision,
            variant=config.variant,
            use_safetensors=None if config.allow_pickle_weights else True,
            **{**null, **adapter_class.load_kwargs, **quantized},
        )
    except (OSError, ValueError, EnvironmentError) as e:
        text = first_line(e)
        if "safetensors" in text.lower() and not config.allow_pickle_weights:
            raise InputError(
                f"pretrained_model_name_or_path: {source} has no safetensors weights ({text}); convert them, or pass "
                "--allow_pickle_weights if you trust the source"
            ) from None
        raise InputError(f"pretrained_model_name_or_path: cannot load {source} ({text})") from None
    except Exception as e:  # corrupt weight files surface as safetensors/torch errors of several types
        raise InputError(
            f"pretrained_model_name_or_path: weights in {source} could not be read ({type(e).__name__}: "
            f"{first_line(e)}); re-download or re-save the pipeline"
        ) from None
    pipeline.register_to_config(**{k: v for k, v in index.items() if not k.startswith("_") and k not in
                                   pipeline.components})  # e.g. DiT's id2label, which loading drops
    if config.quantize_base != "none":  # the backward keeps the base quantized (tuners/quantization.py)
        from ..tuners.quantization import keep_quantized_for_backward

        keep_quantized_for_backward(getattr(pipeline, adapter_class.denoiser_name))
    if config.pretrained_vae_model_name_or_path:  # encodes, samples and is exported in place of the base's vae/
        pipeline.vae = load_separate_vae(config, type(pipeline.vae), pipeline.vae.config)
    return adapter_class(pipeline, config)


def base_folder(config: ModelConfig) -> Path | None:
    """The pretrained pipeline's folder on this machine: the local folder itself, or the Hub id's snapshot in the
    local Hugging Face cache (looked up, never downloaded); None when neither exists."""
    path = Path(config.pretrained_model_name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(config.pretrained_model_name_or_path, revision=config.revision,
                                      local_files_only=True))
    except Exception:  # not in the cache (or not a Hub id): the caller falls back
        return None


SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """A component folder's safetensors files of `variant` (`model.fp16.safetensors`, `...fp16-00001-of-00002...`),
    or those without a variant infix when None."""
    files = sorted(folder.glob("*.safetensors"))
    if variant:
        return [f for f in files if f".{variant}." in f.name or f".{variant}-" in f.name]
    return [f for f in files if f.name.count(".") == 1]


def stored_dtype(config: ModelConfig, component: str):
    """The floating dtype a component's weights are stored in (the most common one in its safetensors header,
    read without loading a tensor), as a torch.dtype; None when its files are not on this machine."""
    import struct
    from collections import Counter

    import torch

    folder = base_folder(config)
    files = _weight_files(folder / component, config.variant) if folder is not None else []
    if not files:
        return None
    with files[0].open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    counts = Counter(v["dtype"] for k, v in header.items()
                     if k != "__metadata__" and v["dtype"] in SAFETENSORS_DTYPES)
    return getattr(torch, SAFETENSORS_DTYPES[counts.most_common(1)[0][0]]) if counts else None
