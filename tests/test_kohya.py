"""--lora_export_format kohya: the LoRA also in the kohya / ComfyUI key format, read back by stock diffusers."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from launch import tiny_run_args, train_in_process
from sadm_finetune.config import build_config
from sadm_finetune.errors import ConfigError
from sadm_finetune.models.kohya import KOHYA_WEIGHT_NAME, to_kohya
from sadm_finetune.models.loading import FAMILIES
from tiny_sd import build_captioned_folder, build_tiny_sd_pipeline

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def test_kohya_keys_and_alpha():
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    peft = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight": down,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight": up}
    kohya = to_kohya(peft, alpha=8)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert set(kohya) == {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"}
    assert torch.equal(kohya[f"{stem}.lora_down.weight"], down)
    assert torch.equal(kohya[f"{stem}.lora_up.weight"], up)
    assert kohya[f"{stem}.alpha"].dim() == 0 and kohya[f"{stem}.alpha"].item() == 8.0  # the run's alpha, not the rank


def test_kohya_needs_a_lora_run_of_a_family_that_has_the_format():
    base = {"pretrained_model_name_or_path": "x", "train_data_dir": "d", "lora_export_format": "kohya"}
    with pytest.raises(ConfigError, match="lora_export_format: kohya is a LoRA file format.*add --trainable lora"):
        build_config(base)
    config = build_config({**base, "trainable": "lora"})
    for family in FAMILIES:
        if family.pipeline_classes[0] in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
            family.check_config(config)
        else:
            with pytest.raises(ConfigError, match="lora_export_format: kohya LoRA files exist for Stable Diffusion"):
                family.check_config(config)


@pytest.mark.slow
def test_sd_kohya_file_loads_with_stock_diffusers_like_the_diffusers_file(tmp_path, stock_diffusers):
    base = build_tiny_sd_pipeline(tmp_path / "base")
    data = build_captioned_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=2) + [
        "--trainable", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
        "--lora_export_format", "kohya", "--report_to", "none"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]

    with safe_open(str(out / KOHYA_WEIGHT_NAME), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    with safe_open(str(out / DIFFUSERS_WEIGHT_NAME), "pt") as f:
        num_diffusers = len(list(f.keys()))
    downs = [k for k in keys if k.endswith(".lora_down.weight")]
    assert all(k.startswith("lora_unet_") for k in keys) and len(downs) * 2 == num_diffusers
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert {k.split(".")[0] + ".alpha" for k in downs} == {k for k in keys if k.endswith(".alpha")}
    assert alphas == {8.0} and metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8.0"
    assert not list(out.glob(".tmp-*"))
    assert KOHYA_WEIGHT_NAME in (out / "README.md").read_text()

    # Stock diffusers (no sadm_finetune) loads each file onto the base: the same images.
    seen = stock_diffusers.load(base, prompts=["a red square"], lora=out,
                                lora_weight_names=[DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME])
    assert seen.get("error") is None, seen["error"]
    assert not seen["sadm_finetune_imported"]
    images = {name: np.asarray(value) for name, value in seen["lora_images"].items()}
    np.testing.assert_allclose(images[KOHYA_WEIGHT_NAME], images[DIFFUSERS_WEIGHT_NAME], atol=1e-5)
    assert images[KOHYA_WEIGHT_NAME].shape == (1, 32, 32, 3)
    # ... and the LoRA is in them: applied, the diffusers file changes the base's images (so both files hold it).
    change = stock_diffusers.load(base, prompts=["a red square"], lora=out)
    assert change.get("error") is None and change["lora_change"] > 1e-3, change
