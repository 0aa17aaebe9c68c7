"""Every recipe in configs/ resolves (dry run); option checks that must fail before any model loads."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sadm_finetune.cli import main
from sadm_finetune.config.run import load_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"dit-xl-2-256-imagenet.yaml", "dit-xl-2-256-lora.yaml", "sd15-lora.yaml", "sdxl-lora.yaml",
            "pixart-sigma-lora.yaml", "sd35-medium-lora.yaml", "sdxl-dreambooth-lora.yaml", "flux-dev-lora.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_dry_runs(recipe, capsys):
    args = ["--config", str(recipe), "--dry_run"]
    values = load_yaml(recipe)
    if not (values.get("train_data_dir") or values.get("dataset_name")):  # a recipe for the user's own data
        args += ["--train_data_dir", "/tmp/x"]
    assert main(args) == 0, capsys.readouterr().err
    resolved = yaml.safe_load(capsys.readouterr().out)
    for key, value in values.items():  # every recipe value survives into the resolved config
        section = next(s for s in resolved.values() if key in s)
        assert section[key] == value, key


def test_recipe_intent():
    dit = load_yaml(ROOT / "configs" / "dit-xl-2-256-imagenet.yaml")
    assert dit["pretrained_model_name_or_path"] == "facebook/DiT-XL-2-256" and dit["use_ema"]
    assert dit.get("trainable", "full") == "full" and dit["resolution"] == 256
    dit_lora = load_yaml(ROOT / "configs" / "dit-xl-2-256-lora.yaml")
    assert dit_lora["trainable"] == "lora" and dit_lora["pretrained_model_name_or_path"] == "facebook/DiT-XL-2-256"
    sd = load_yaml(ROOT / "configs" / "sd15-lora.yaml")
    assert sd["pretrained_model_name_or_path"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert sd["trainable"] == "lora" and sd["resolution"] == 512
    sdxl = load_yaml(ROOT / "configs" / "sdxl-lora.yaml")
    assert sdxl["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert sdxl["trainable"] == "lora" and sdxl["resolution"] == 1024 and 16 <= sdxl["lora_rank"] <= 32
    assert sdxl["cache_latents"] and sdxl["cache_text_embeddings"] and sdxl["aspect_ratio_buckets"]
    assert sdxl["gradient_checkpointing"] and 0 < sdxl["structure_weight"] <= 0.05
    pixart = load_yaml(ROOT / "configs" / "pixart-sigma-lora.yaml")
    assert pixart["pretrained_model_name_or_path"] == "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
    assert pixart["trainable"] == "lora" and pixart["resolution"] == 1024 and 16 <= pixart["lora_rank"] <= 32
    assert pixart["cache_latents"] and pixart["cache_text_embeddings"] and pixart["aspect_ratio_buckets"]
    assert pixart["gradient_checkpointing"] and pixart["learned_sigma_loss"] == "vlb"
    assert pixart["learning_rate"] == 1e-4 and 0 < pixart["structure_weight"] <= 0.05
    booth = load_yaml(ROOT / "configs" / "sdxl-dreambooth-lora.yaml")
    assert booth["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert booth["with_prior_preservation"] and booth["class_prompt"] and booth["class_data_dir"]
    assert booth["instance_prompt"] == "a photo of sks dog" and booth["trainable"] == "lora"
    assert booth["num_class_images"] == 100 and booth["prior_loss_weight"] == 1.0 and booth["resolution"] == 1024
    assert booth["train_batch_size"] >= 2 and booth["cache_latents"] and booth["center_crop"]
    sd35 = load_yaml(ROOT / "configs" / "sd35-medium-lora.yaml")
    assert sd35["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-3.5-medium"
    assert sd35["trainable"] == "lora" and sd35["resolution"] in (512, 1024) and 16 <= sd35["lora_rank"] <= 64
    assert sd35["learning_rate"] == 1e-4 and sd35["lr_scheduler"] == "constant"
    assert sd35["weighting_scheme"] == "logit_normal" and "snr_gamma" not in sd35  # flow matching, not DDPM
    assert sd35["precondition_outputs"] is True  # the SD3 script's defaults, written out
    assert sd35["cache_latents"] and sd35["cache_text_embeddings"] and sd35["gradient_checkpointing"]
    flux = load_yaml(ROOT / "configs" / "flux-dev-lora.yaml")
    assert flux["pretrained_model_name_or_path"] == "black-forest-labs/FLUX.1-dev"
    assert flux["trainable"] == "lora" and flux["resolution"] == 1024 and flux["lora_rank"] == 16
    assert flux["learning_rate"] == 1e-4 and flux["adam_weight_decay"] == 1e-4 and flux["guidance_scale"] == 3.5
    assert flux["weighting_scheme"] == "none" and "precondition_outputs" not in flux  # the Flux script's defaults
    assert flux["cache_latents"] and flux["cache_text_embeddings"] and flux["gradient_checkpointing"]
    assert flux["aspect_ratio_buckets"] and flux["train_batch_size"] >= 2
    for recipe in (dit, dit_lora, sd, sdxl, pixart, sd35, flux):  # precision belongs to `accelerate launch`, not to a recipe
        assert "mixed_precision" not in recipe


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_xformers_without_cuda_is_one_line_before_loading(tmp_path):
    cmd = [sys.executable, "-m", "sadm_finetune.cli", "--pretrained", str(tmp_path / "not-loaded"),
           "--train_data_dir", str(tmp_path), "--enable_xformers_memory_efficient_attention"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sadm-train: error: enable_xformers_memory_efficient_attention: xformers needs a CUDA GPU and none is "
        "visible; drop the flag (PyTorch SDPA attention is the default)"]


LAUNCH = re.compile(r"(`?)accelerate launch((?:\s+[-\w.=/$]+)*?)\s+train_sadm\.py")


def _launch_lines():
    """Every `accelerate launch ... train_sadm.py` command in the README, docs/ and the recipes' comments, its
    continuation lines joined (a shell `\\` line break, and the `#` of a YAML comment)."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *RECIPES]:
        text = re.sub(r"\\\n\s*#?\s*", " ", path.read_text())
        for match in LAUNCH.finditer(text):
            if match.group(1) and not match.group(2).strip():
                continue  # prose naming the program (`accelerate launch train_sadm.py`), not a command line
            yield path.name, match.group(2).split()


def test_documented_launch_lines_are_quiet_and_pass_what_accelerate_warns_about():
    """`-q` keeps a failed run to the toolkit's one-line error; --num_processes, --num_machines, --mixed_precision
    and --dynamo_backend are what accelerate otherwise warns it defaulted (commands/launch.py, without a config
    file); with several processes and no config file, --multi_gpu (else it warns it enabled multi-GPU itself)."""
    lines = list(_launch_lines())
    assert len(lines) >= 12, lines  # README (7), docs/scaling.md (3), the recipes' comments
    for name, flags in lines:
        assert "-q" in flags, (name, flags)
        if "--config_file" in flags:
            continue
        for flag in ("--num_processes", "--num_machines", "--mixed_precision", "--dynamo_backend"):
            assert flag in flags, (name, flag, flags)
        if flags[flags.index("--num_processes") + 1] != "1":
            assert "--multi_gpu" in flags, (name, flags)
