"""Each family's model card, written offline by `card.write_model_card` and read back with huggingface_hub's
ModelCard: diffusers' tags for the family and the Hub's LoRA tags, `base_model` for a Hub base (never a local path),
the base's licence inherited from its own card (local folder or Hugging Face cache), the widget gallery, the trigger
words hook, and a reproduce command that runs from the repository root."""

import shlex
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from sadm_finetune.export.card import CardFacts, REPO_ROOT, reproduce_command, write_model_card
from sadm_finetune.config.run import build_config
from sadm_finetune.train.finish import kohya_labels
from sadm_finetune.families.dit import DiTAdapter
from sadm_finetune.families.pixart import PixArtAdapter
from sadm_finetune.families.sd import StableDiffusionAdapter
from sadm_finetune.families.sd3 import StableDiffusion3Adapter
from sadm_finetune.families.sdxl import StableDiffusionXLAdapter
from hub_cache import cache_model, hub_cache  # noqa: F401 (fixture)

CASES = [  # adapter class, a Hub base, the tags its family's diffusers training scripts write
    (DiTAdapter, "facebook/DiT-XL-2-256", {"dit"}),
    (StableDiffusionAdapter, "stable-diffusion-v1-5/stable-diffusion-v1-5", {"stable-diffusion", "text-to-image"}),
    (StableDiffusionXLAdapter, "stabilityai/stable-diffusion-xl-base-1.0",
     {"stable-diffusion-xl", "stable-diffusion-xl-diffusers", "text-to-image"}),
    (StableDiffusion3Adapter, "stabilityai/stable-diffusion-3.5-medium", {"sd3", "sd3-diffusers", "text-to-image"}),
    (PixArtAdapter, "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", {"pixart-sigma", "pixart-sigma-diffusers", "text-to-image"}),
]


def _write(out, base, tags=("dit",), lora=False, **facts):
    options = {"pretrained_model_name_or_path": str(base), "train_data_dir": "d", "output_dir": str(out)}
    config = build_config({**options, **({"trainable": "lora"} if lora else {})})
    out.mkdir(exist_ok=True)
    card = write_model_card(out, config, CardFacts(list(tags), "a data set", {"steps": 3}, [("Use:", "x = 1")],
                                                   argv=[], **facts))
    return ModelCard.load(card), card.read_text()


@pytest.mark.parametrize("adapter_class,base,tags", CASES, ids=lambda c: getattr(c, "__name__", None))
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_card_names_the_hub_base_and_the_familys_tags(tmp_path, adapter_class, base, tags, lora):
    adapter = object.__new__(adapter_class)  # card_tags reads class attributes (and PixArt the pipeline's class)
    adapter.pipeline = SimpleNamespace()
    card, text = _write(tmp_path / "out", base, adapter.card_tags(), lora,
                        widget=[("a red square", "samples/final-0.png")])
    data = card.data
    assert data.base_model == base and data.library_name == "diffusers"
    assert tags | {"sadm", "diffusers", "diffusers-training"} <= set(data.tags)
    assert ("lora" in data.tags) == ("template:sd-lora" in data.tags) == lora  # what the Hub's LoRA pages read
    assert data.widget == [{"text": "a red square", "output": {"url": "samples/final-0.png"}}]
    assert "license" not in data.to_dict()  # no card of the base on this machine: nothing invented


def test_a_local_base_is_never_written_as_base_model_and_its_licence_is_inherited(tmp_path):
    local = tmp_path / "my-base"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: other\nlicense_name: my-licence\nlicense_link: LICENSE.md\n---\n")
    card, text = _write(tmp_path / "out", local)
    assert card.data.base_model is None and str(tmp_path) not in text
    assert (card.data.license, card.data.license_name, card.data.license_link) == ("other", "my-licence", None)


def test_a_hub_bases_licence_comes_from_its_card_in_the_cache(tmp_path, hub_cache):  # noqa: F811
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "README.md").write_text("---\nlicense: other\nlicense_name: stabilityai-ai-community\n"
                                        "license_link: LICENSE.md\ntags: [x]\n---\n# SD 3.5\n")
    cache_model(hub_cache, "stabilityai/stable-diffusion-3.5-medium", snapshot, "c" * 40, ["main"])
    card, _ = _write(tmp_path / "out", "stabilityai/stable-diffusion-3.5-medium", lora=True)
    assert card.data.license == "other" and card.data.license_name == "stabilityai-ai-community"
    assert card.data.license_link == \
        "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md"
    cache_model(hub_cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", snapshot, "d" * 40, ["main"])
    (hub_cache / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "snapshots" / ("d" * 40) /
     "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n")
    card, _ = _write(tmp_path / "out2", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert card.data.license == "creativeml-openrail-m" and card.data.license_name is None


def test_trigger_words_hook_reaches_the_card_and_the_kohya_labels(tmp_path):
    config = build_config({"pretrained_model_name_or_path": "org/base", "train_data_dir": "d", "trainable": "lora"})
    assert "modelspec.trigger_phrase" not in {k for k, v in kohya_labels(config, tmp_path, 512).items() if v}
    config.data.instance_prompt = "a photo of sks dog"  # --instance_prompt
    card = write_model_card(tmp_path, config, CardFacts(["stable-diffusion"], "d", {}, [], argv=[],
                                                        prompts=["a photo of sks dog in a bucket"]))
    assert ModelCard.load(card).data.instance_prompt == "a photo of sks dog"
    assert "Use `a photo of sks dog` in the prompt" in card.read_text()
    assert "The samples above were made with:\n\n- `a photo of sks dog in a bucket`" in card.read_text()
    labels = kohya_labels(config, tmp_path, 512)
    assert labels["modelspec.trigger_phrase"] == "a photo of sks dog" and labels["modelspec.resolution"] == "512x512"
    config.data.caption_prefix = "ohwx"  # the prefix goes in front, as in every caption
    assert kohya_labels(config, tmp_path, 512)["modelspec.trigger_phrase"] == "ohwx a photo of sks dog"
    config.data.instance_prompt = None  # trigger words alone
    assert kohya_labels(config, tmp_path, 512)["modelspec.trigger_phrase"] == "ohwx"


def test_reproduce_command_runs_from_the_repository_root(tmp_path, monkeypatch):
    from accelerate.commands.launch import launch_command_parser

    from sadm_finetune.cli import main

    recipe = REPO_ROOT / "configs" / "sd15-lora.yaml"
    command = reproduce_command(["--config", str(recipe), "--train_data_dir", str(tmp_path / "my-data"),
                                 "--output_dir", str(tmp_path / "out")], num_processes=2, mixed_precision="bf16")
    tokens = shlex.split(command)
    assert tokens[:3] == ["accelerate", "launch", "-q"]
    launch = launch_command_parser().parse_args(tokens[2:])  # what accelerate would otherwise fill in, with a warning
    assert (launch.quiet, launch.multi_gpu, launch.num_processes, launch.num_machines, launch.mixed_precision,
            launch.dynamo_backend) == (True, True, 2, 1, "bf16", "no")
    assert launch.training_script == "train_sadm.py" and (REPO_ROOT / launch.training_script).is_file()
    assert launch.training_script_args[:2] == ["--config", "configs/sd15-lora.yaml"]  # the recipe's real path
    assert "my-data" in tokens and str(tmp_path) not in command
    monkeypatch.chdir(REPO_ROOT)  # the script's own arguments resolve there
    assert main([*launch.training_script_args, "--dry_run"]) == 0
