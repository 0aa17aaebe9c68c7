"""Load a pretrained pipeline (Hub id or folder) and pick its family adapter; clear errors first."""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import InputError, first_line
from .dit import DiTAdapter
from .family import FamilyAdapter
from .index import read_pipeline_index
from .pixart import PixArtAdapter
from .sd import StableDiffusionAdapter
from .sd3 import StableDiffusion3Adapter
from .sdxl import StableDiffusionXLAdapter
from .vae import load_separate_vae

FAMILIES: tuple[type[FamilyAdapter], ...] = (DiTAdapter, StableDiffusionAdapter, StableDiffusionXLAdapter,
                                              PixArtAdapter, StableDiffusion3Adapter)


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


def load_family(config: ModelConfig) -> FamilyAdapter:
    """Load the pipeline in fp32 (safetensors only unless allowed) and wrap it in its family adapter."""
    from diffusers import DiffusionPipeline

    source = config.pretrained_model_name_or_path
    index = read_pipeline_index(config)
    adapter_class = _adapter_class(index["_class_name"], source)
    try:
        pipeline = DiffusionPipeline.from_pretrained(
            source,
            revision=config.revision,
            variant=config.variant,
            use_safetensors=None if config.allow_pickle_weights else True,
            **{**saved_as_null(index), **adapter_class.load_kwargs},
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
    if config.pretrained_vae_model_name_or_path:  # encodes, samples and is exported in place of the base's vae/
        pipeline.vae = load_separate_vae(config, type(pipeline.vae), pipeline.vae.config)
    return adapter_class(pipeline, config)
