"""Each family's model card: diffusers' tags for the family, `base_model` for a Hub base (never a local path),
the LoRA tag and usage code for a LoRA run; written offline by `export.write_model_card`."""

from types import SimpleNamespace

import pytest
import yaml

from sadm_finetune.config import build_config
from sadm_finetune.export import write_model_card
from sadm_finetune.models.dit import DiTAdapter
from sadm_finetune.models.pixart import PixArtAdapter
from sadm_finetune.models.sd import StableDiffusionAdapter
from sadm_finetune.models.sd3 import StableDiffusion3Adapter
from sadm_finetune.models.sdxl import StableDiffusionXLAdapter

CASES = [  # adapter class, a Hub base, the tags its family's diffusers training scripts write
    (DiTAdapter, "facebook/DiT-XL-2-256", {"dit"}),
    (StableDiffusionAdapter, "stable-diffusion-v1-5/stable-diffusion-v1-5", {"stable-diffusion", "text-to-image"}),
    (StableDiffusionXLAdapter, "stabilityai/stable-diffusion-xl-base-1.0",
     {"stable-diffusion-xl", "stable-diffusion-xl-diffusers", "text-to-image"}),
    (StableDiffusion3Adapter, "stabilityai/stable-diffusion-3.5-medium", {"sd3", "sd3-diffusers", "text-to-image"}),
    (PixArtAdapter, "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", {"pixart-sigma", "pixart-sigma-diffusers", "text-to-image"}),
]


def _card(path):
    return yaml.safe_load(path.read_text().split("---")[1])


@pytest.mark.parametrize("adapter_class,base,tags", CASES, ids=lambda c: getattr(c, "__name__", None))
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_card_names_the_hub_base_and_the_familys_tags(tmp_path, adapter_class, base, tags, lora):
    adapter = object.__new__(adapter_class)  # card_tags reads class attributes (and PixArt the pipeline's class)
    adapter.pipeline = SimpleNamespace()
    config = build_config({"pretrained_model_name_or_path": base, "train_data_dir": str(tmp_path),
                           "output_dir": str(tmp_path / "out")})
    code = "pipe.load_lora_weights('org/sadm-lora')"
    card = write_model_card(tmp_path, config, adapter.card_tags(), "a data set", {"steps": 3}, argv=[],
                            lora_usage=code if lora else None)
    data = _card(card)
    assert data["base_model"] == base and data["library_name"] == "diffusers"
    assert tags | {"sadm", "diffusers"} <= set(data["tags"])
    assert ("lora" in data["tags"]) == lora
    assert (code in card.read_text()) == lora


def test_a_local_base_is_never_written_as_base_model(tmp_path):
    local = tmp_path / "my-base"
    local.mkdir()
    config = build_config({"pretrained_model_name_or_path": str(local), "train_data_dir": str(tmp_path),
                           "output_dir": str(tmp_path / "out")})
    card = write_model_card(tmp_path, config, ["dit"], "a data set", {}, argv=[])
    assert "base_model" not in _card(card) and str(tmp_path) not in card.read_text()
