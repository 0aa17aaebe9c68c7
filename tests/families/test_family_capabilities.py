"""Families declare what they can do (`FamilyAdapter.capabilities`); one generic check (`check_capabilities`, the rows of
`families.base.REQUIREMENTS`) derives every refusal from the declaration. Checked on classes only: no weights load."""

import pytest

from sadm_finetune.config.run import build_config
from sadm_finetune.families.base import CAPABILITIES, REQUIREMENTS, FamilyAdapter
from sadm_finetune.families.dit import DiTAdapter
from sadm_finetune.families.flux import FluxAdapter
from sadm_finetune.families.qwen_image import QwenImageAdapter
from sadm_finetune.families.loading import FAMILIES
from sadm_finetune.families.pixart import PixArtAdapter
from sadm_finetune.families.sd import StableDiffusionAdapter
from sadm_finetune.families.sd3 import StableDiffusion3Adapter
from sadm_finetune.families.sdxl import StableDiffusionXLAdapter
from sadm_finetune.families.text import TextFamilyAdapter
from sadm_finetune.utils.errors import ConfigError

BASE = {"pretrained_model_name_or_path": "org/base", "train_data_dir": "d"}

# One config per row of REQUIREMENTS, asking for that option alone.
ASKS = {
    "lora_export_format": {"trainable": "lora", "lora_export_format": "kohya"},
    "train_text_encoder": {"trainable": "lora", "train_text_encoder": True},
    "validation_class_labels": {"validation_class_labels": [0]},
    "validation_prompts": {"validation_prompts": ["a dog"]},
    "cache_text_embeddings": {"cache_text_embeddings": True},
    "with_prior_preservation": {"with_prior_preservation": True, "class_prompt": "a dog", "class_data_dir": "c"},
    "instance_prompt": {"instance_prompt": "a photo of sks dog"},
    "caption_prefix": {"caption_prefix": "ohwx"},
    "pos_embed_transfer": {"pos_embed_transfer": "extend"},
    "snr_gamma": {"snr_gamma": 5.0},
    "trainable": {"trainable": "difffit"},
    "aspect_ratio_buckets": {"aspect_ratio_buckets": True},
    "guidance_scale": {"guidance_scale": 3.5},
    "weighting_scheme": {"weighting_scheme": "logit_normal"},
    "precondition_outputs": {"precondition_outputs": True},
}
TEXT_OPTIONS = {"validation_prompts", "cache_text_embeddings", "with_prior_preservation", "instance_prompt",
                "caption_prefix"}
# What each family accepted before the declarations existed (its own refusal rows then): a changed declaration that
# lets an option through, or refuses one, shows here.
ACCEPTS = {
    DiTAdapter: {"validation_class_labels", "pos_embed_transfer", "snr_gamma", "trainable"},
    StableDiffusionAdapter: TEXT_OPTIONS | {"lora_export_format", "snr_gamma", "trainable", "aspect_ratio_buckets",
                                            "train_text_encoder"},
    StableDiffusionXLAdapter: TEXT_OPTIONS | {"lora_export_format", "snr_gamma", "trainable", "aspect_ratio_buckets",
                                              "train_text_encoder"},
    PixArtAdapter: TEXT_OPTIONS | {"snr_gamma", "trainable", "aspect_ratio_buckets"},
    StableDiffusion3Adapter: TEXT_OPTIONS | {"aspect_ratio_buckets", "weighting_scheme", "precondition_outputs"},
    FluxAdapter: TEXT_OPTIONS | {"aspect_ratio_buckets", "weighting_scheme", "precondition_outputs", "guidance_scale"},
    QwenImageAdapter: TEXT_OPTIONS | {"aspect_ratio_buckets", "weighting_scheme", "precondition_outputs"},
}


class Bare(FamilyAdapter):
    """A new family that declares nothing."""
    family = "bare"
    display_name = "Bare"
    pipeline_classes = ("BarePipeline",)


def _config(field: str):
    return build_config({**BASE, **ASKS[field]})


def test_every_requirement_has_a_case_and_a_known_capability():
    assert {row.field for row in REQUIREMENTS} == set(ASKS)
    assert {row.capability for row in REQUIREMENTS} <= set(CAPABILITIES)
    for family in FAMILIES:
        assert family.capabilities <= set(CAPABILITIES), family


@pytest.mark.parametrize("row", REQUIREMENTS, ids=lambda row: row.field)
def test_a_family_that_declares_nothing_refuses_every_optional_feature(row):
    Bare.check_config(build_config(BASE))  # nothing asked: nothing refused
    with pytest.raises(ConfigError) as error:
        Bare.check_config(_config(row.field))
    message = str(error.value)
    assert error.value.field == row.field and message.startswith(f"{row.field}: ")
    assert "Bare" in message and f"--{row.field}" in message and len(message.splitlines()) == 1, message
    # ... and declaring the row's capability alone lets it through: the refusal comes from the declaration.
    declared = type("Declared", (Bare,), {"capabilities": frozenset({row.capability})})
    declared.check_config(_config(row.field))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.__name__)
def test_each_family_accepts_what_it_declares(family):
    assert set(ACCEPTS) == set(FAMILIES)
    for field in ASKS:
        if field in ACCEPTS[family]:
            family.check_config(_config(field))
        else:
            with pytest.raises(ConfigError, match=f"^{field}: "):
                family.check_config(_config(field))


def test_a_family_words_its_own_reason_and_the_generic_words_its_declaration():
    with pytest.raises(ConfigError, match=r"^pos_embed_transfer: Stable Diffusion XL's UNet has no positional"):
        StableDiffusionXLAdapter.check_config(_config("pos_embed_transfer"))
    with pytest.raises(ConfigError, match=r"^snr_gamma: .* Stable Diffusion 3 trains with flow matching; drop"):
        StableDiffusion3Adapter.check_config(_config("snr_gamma"))
    with pytest.raises(ConfigError, match=r"^weighting_scheme: logit_normal is a flow-matching option and PixArt "
                                          r"trains with the DDPM process; drop --weighting_scheme"):
        PixArtAdapter.check_config(_config("weighting_scheme"))
    with pytest.raises(ConfigError, match=r"^train_text_encoder: DiT is class-conditional; text-encoder LoRA is wired "
                                          r"for the CLIP text encoders of Stable Diffusion 1.x/2.x and SDXL only"):
        DiTAdapter.check_config(_config("train_text_encoder"))
    with pytest.raises(ConfigError, match=r"^validation_prompts: DiT is class-conditional and takes no prompts"):
        DiTAdapter.check_config(_config("validation_prompts"))
    with pytest.raises(ConfigError, match=r"^disc_class_conditional: Bare is unconditional and has no class labels"):
        Bare.check_config(build_config({**BASE, "disc_class_conditional": True}))  # SADM's section, by its own check


def test_declarations_match_the_code_behind_them():
    for family in FAMILIES:
        caps = family.capabilities
        # text: the shared text code; SD3 and Flux no longer borrow SD's UNet parts.
        assert ("text" in caps) == issubclass(family, TextFamilyAdapter)
        assert "text" not in caps or family.text_encoder_names
        assert ("aspect_ratio_buckets" in caps) == \
            (family.aspect_ratio_bucket_multiple is not FamilyAdapter.aspect_ratio_bucket_multiple)
        assert ("stock_lora_loader" in caps) == (family.pipeline_class is not None and
                                                 hasattr(family.pipeline_class, "load_lora_weights"))
        assert ("kohya_lora" in caps) == hasattr(family, "kohya_labels")
        assert ("text_encoder_lora" in caps) == hasattr(family, "text_encoder_lora_exclude")
        assert family.feature_blocks is not FamilyAdapter.feature_blocks and "block_hidden_states" in caps
    for family in (StableDiffusion3Adapter, FluxAdapter):
        assert not issubclass(family, StableDiffusionAdapter)


def test_an_unknown_capability_is_refused_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"Typo.capabilities: unknown \['aspect_ratio_bucket'\]"):
        type("Typo", (Bare,), {"capabilities": frozenset({"aspect_ratio_bucket"})})
