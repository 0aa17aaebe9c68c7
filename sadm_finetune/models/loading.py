"""Load a pretrained pipeline (Hub id or folder) and pick its family adapter; clear errors first."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig
from ..errors import InputError, first_line
from .dit import DiTAdapter
from .family import FamilyAdapter
from .sd import StableDiffusionAdapter

FAMILIES: tuple[type[FamilyAdapter], ...] = (DiTAdapter, StableDiffusionAdapter)


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


def read_pipeline_index(config: ModelConfig) -> dict:
    """The pipeline's model_index.json, read without loading any weights."""
    source = config.pretrained_model_name_or_path
    path = Path(source).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise InputError(
                f"pretrained_model_name_or_path: {source} has no model_index.json, so it is not a diffusers "
                "pipeline folder; point --pretrained at a folder saved with save_pretrained"
            )
        try:
            content = json.loads(index.read_text())
            content["_class_name"]
            return content
        except (json.JSONDecodeError, KeyError):
            raise InputError(f"pretrained_model_name_or_path: {index} is not a valid model_index.json; "
                             "re-save the pipeline") from None
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise InputError(f"pretrained_model_name_or_path: folder {source} not found; pass an existing pipeline "
                         "folder or a Hub id like facebook/DiT-XL-2-256")
    from diffusers import DiffusionPipeline
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
        index = DiffusionPipeline.load_config(source, revision=config.revision)
    except HFValidationError:
        raise InputError(f"pretrained_model_name_or_path: {source!r} is neither a folder nor a Hub id; "
                         "pass e.g. facebook/DiT-XL-2-256") from None
    except Exception as e:  # offline, missing repo, no access: one line, not a traceback
        reason = first_line(e)
        raise InputError(f"pretrained_model_name_or_path: cannot read {source} from the Hub ({reason}); check the "
                         "id, your network and `huggingface-cli login`") from None
    return dict(index)


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
            **adapter_class.load_kwargs,
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
    return adapter_class(pipeline, config)
