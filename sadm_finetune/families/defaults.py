"""Each pipeline family's own defaults: where the family's upstream training script sets an option to another value
than the generic dataclass default, and a user of that family expects the script's value, the family supplies it
for the fields the user did not set. `config.build_config` applies them: dataclass defaults < family defaults <
the YAML recipe < flags. docs/defaults.md lists every option family by family, next to the upstream script's value
and the line it comes from, and says why the other differences stay.

Light on purpose (no torch, no diffusers): a dry run reads the pipeline's model_index.json and this table only.
"""

from __future__ import annotations

from typing import Any

from ..utils.errors import SADMError

# model_index.json `_class_name` -> {field: value}. Sources (docs/defaults.md has the lines):
# diffusers examples/text_to_image/train_text_to_image.py, train_text_to_image_lora.py (SD 1.x/2.x) and
# train_text_to_image_lora_sdxl.py (SDXL): --adam_weight_decay 1e-2; examples/dreambooth/train_dreambooth_lora_sd3.py:
# --adam_weight_decay 1e-04, --weighting_scheme logit_normal, --precondition_outputs 1;
# examples/dreambooth/train_dreambooth_lora_flux.py: --adam_weight_decay 1e-04, --weighting_scheme none (uniform
# timesteps, unweighted loss), --guidance_scale 3.5.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "StableDiffusionPipeline": {"adam_weight_decay": 1e-2},
    "StableDiffusionXLPipeline": {"adam_weight_decay": 1e-2},
    "StableDiffusion3Pipeline": {"adam_weight_decay": 1e-4, "weighting_scheme": "logit_normal",
                                 "precondition_outputs": True},
    "FluxPipeline": {"adam_weight_decay": 1e-4, "guidance_scale": 3.5},  # weighting_scheme none: the generic default
    "QwenImagePipeline": {"adam_weight_decay": 1e-4},  # train_dreambooth_lora_qwen_image.py; weighting none: generic
}


def pipeline_class(source: str | None, revision: str | None = None) -> str | None:
    """The pipeline's `_class_name` from its model_index.json (a folder, or a Hub id: the file alone, from the local
    cache offline), or None where it cannot be read now: the run stops with that one-line error when it loads the
    pipeline, so building the configuration does not."""
    if not source:
        return None
    from ..config.run import ModelConfig
    from .model_index import read_pipeline_index

    try:
        return read_pipeline_index(ModelConfig(pretrained_model_name_or_path=source, revision=revision))["_class_name"]
    except SADMError:
        return None


def defaults_for(source: str | None, revision: str | None = None) -> dict[str, Any]:
    """{field: value} the pipeline at `source` trains with unless told otherwise ({} for an unknown family)."""
    return dict(FAMILY_DEFAULTS.get(pipeline_class(source, revision) or "", {}))
