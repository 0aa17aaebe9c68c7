"""The kohya / ComfyUI key format (by default beside the diffusers file for SD and SDXL; --lora_export_format picks),
read back by diffusers' own kohya loader; which families write which files."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffusers import StableDiffusionPipeline
from PIL import Image

from launch import tiny_run_args, train_in_process
from sadm_finetune.config.run import build_config
from sadm_finetune.utils.errors import ConfigError
from sadm_finetune.tuners.kohya import KOHYA_WEIGHT_NAME, to_kohya
from sadm_finetune.families.loading import FAMILIES
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


def test_lora_file_options_per_family():
    base = {"pretrained_model_name_or_path": "x", "train_data_dir": "d"}
    for field, value in (("lora_export_format", "kohya"), ("lora_export_format", "both"), ("export_merged", True)):
        with pytest.raises(ConfigError, match=f"{field}: .*(LoRA file format|LoRA option).*"):
            build_config({**base, field: value})
    lora = build_config({**base, "trainable": "lora"})
    full, merged = build_config(base), build_config({**base, "trainable": "lora", "export_merged": True})
    for family in FAMILIES:
        kohya = family.pipeline_classes[0] in ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
        stock = kohya or family.pipeline_classes[0] in ("StableDiffusion3Pipeline", "FluxPipeline",
                                                               "QwenImagePipeline")
        # by default both files where ComfyUI / A1111 need the kohya one; no merged pipeline where diffusers loads LoRAs
        assert family.lora_formats(lora.model) == (("diffusers", "kohya") if kohya else ("diffusers",))
        assert family.exports_pipeline(lora.model) is not stock
        assert family.exports_pipeline(full.model) and family.exports_pipeline(merged.model)
        family.check_config(lora)
        for value in ("kohya", "both"):
            config = build_config({**base, "trainable": "lora", "lora_export_format": value})
            if kohya:
                family.check_config(config)
            else:
                with pytest.raises(ConfigError, match="lora_export_format: kohya LoRA files exist for Stable Diff"):
                    family.check_config(config)


@pytest.mark.slow
def test_kohya_only_in_fp16_is_what_the_final_samples_and_the_card_use(tmp_path):
    base = build_tiny_sd_pipeline(tmp_path / "base")
    data = build_captioned_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=2) + [
        "--trainable", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
        "--lora_export_format", "kohya", "--export_dtype", "fp16", "--structure_weight", "0", "--report_to", "none"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / DIFFUSERS_WEIGHT_NAME).exists() and not (out / "model_index.json").exists()
    with safe_open(str(out / KOHYA_WEIGHT_NAME), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in keys}
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    downs = [k for k in keys if k.endswith(".lora_down.weight")]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert {k.split(".")[0] + ".alpha" for k in downs} == {k for k in keys if k.endswith(".alpha")}
    assert dtypes == {torch.float16} and alphas == {8.0}  # --export_dtype, alpha included, as kohya writes it
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["modelspec.resolution"] == "32x32"
    assert metadata["modelspec.title"] == "out" and metadata["ss_sd_model_name"] == "base"
    assert not list(out.glob(".tmp-*"))

    # The final samples are the base with the kohya file applied by diffusers' own kohya loader ...
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    before = pipe(["a red square"], num_inference_steps=2, guidance_scale=1.5, generator=torch.manual_seed(0),
                  output_type="np").images[0]
    pipe.load_lora_weights(out, weight_name=KOHYA_WEIGHT_NAME)
    after = pipe(["a red square"], num_inference_steps=2, guidance_scale=1.5, generator=torch.manual_seed(0),
                 output_type="np").images[0]
    sample = np.asarray(Image.open(out / "samples" / "final-0.png"), dtype=np.float64) / 255
    np.testing.assert_allclose(sample, after, atol=1 / 255 + 1e-6)
    assert np.abs(after - before).max() > 1e-3
    # ... and the card's code loads that file.
    card = (out / "README.md").read_text()
    assert f'weight_name="{KOHYA_WEIGHT_NAME}"' in card and DIFFUSERS_WEIGHT_NAME not in card
