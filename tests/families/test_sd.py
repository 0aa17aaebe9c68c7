"""Stable Diffusion family: text conditioning, caption dropout, checks, and a full fine-tune end to end."""

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from launch import accelerate_launch, offline_env, tiny_run_args
from sadm_finetune.cli import main
from sadm_finetune.config.run import DataConfig, ModelConfig, build_config
from sadm_finetune.data.datasets import open_train_data
from sadm_finetune.utils.errors import ConfigError, InputError
from sadm_finetune.families.loading import load_family
from sadm_finetune.families.sd import StableDiffusionAdapter
from tiny_pipelines import build_image_folder
from tiny_sd import CAPTIONS, build_captioned_folder, build_tiny_sd_pipeline


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "base")


@pytest.fixture(scope="module")
def adapter(tiny_sd):
    return load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_sd), caption_dropout_prob=0.5))


def test_loads_as_the_sd_family(adapter):
    assert isinstance(adapter, StableDiffusionAdapter)
    assert adapter.frozen_modules() == [adapter.vae, adapter.text_encoder]
    assert adapter.default_resolution() == 32 and adapter.denoiser is adapter.pipeline.unet
    assert adapter.latent_patch_size == 1 and adapter.patch_multiple == 4  # a UNet: no patches
    adapter.check_resolution(36)  # latents 9x9: the UNet forwards upsample sizes, as in the pipeline
    with pytest.raises(ConfigError, match=r"resolution: 34 is not divisible by 4 \(the VAE factor\)"):
        adapter.check_resolution(34)


def test_conditioning_is_what_the_pipeline_feeds_the_unet(adapter):
    prompts = list(CAPTIONS[:3])
    cond = adapter.conditioning({"captions": prompts, "pixel_values": torch.zeros(3, 3, 32, 32)},
                                torch.device("cpu"), torch.float32, drop=False)
    expected, _ = adapter.pipeline.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], expected)


def test_caption_dropout_swaps_in_the_empty_prompt(adapter):
    prompts = [CAPTIONS[0]] * 64
    batch = {"captions": prompts, "pixel_values": torch.zeros(64, 3, 32, 32)}
    states = adapter.conditioning(batch, torch.device("cpu"), torch.float32, drop=True,
                                  generator=torch.Generator().manual_seed(0))["encoder_hidden_states"]
    full = adapter.encode_text([CAPTIONS[0]], torch.device("cpu"))["prompt_embeds"]
    empty = adapter.encode_text([""], torch.device("cpu"))["prompt_embeds"]

    def same(a, b):  # encoded in batches of different sizes: equal up to float rounding, not bit for bit
        return torch.allclose(a, b, rtol=1e-5, atol=1e-5)

    assert not same(full[0], empty[0])
    is_empty = [same(s, empty[0]) for s in states]
    assert all(e or same(s, full[0]) for s, e in zip(states, is_empty))
    assert 10 < sum(is_empty) < 54  # p = 0.5
    kept = adapter.conditioning(batch, torch.device("cpu"), torch.float32, drop=False)["encoder_hidden_states"]
    assert all(same(s, full[0]) for s in kept)


def test_uncaptioned_data_is_refused(adapter, tmp_path):
    data = open_train_data(DataConfig(train_data_dir=str(build_image_folder(tmp_path / "classes"))))
    with pytest.raises(InputError, match="caption_column: .* has no caption column.*metadata.jsonl"):
        adapter.check_data(data)
    captioned = open_train_data(DataConfig(train_data_dir=str(build_captioned_folder(tmp_path / "captioned"))))
    adapter.check_data(captioned)
    assert adapter.default_prompts == list(CAPTIONS)  # validation defaults: the first distinct captions


def test_class_options_are_refused_before_loading(tiny_sd, tmp_path, capsys):
    args = ["--pretrained", str(tiny_sd), "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    assert main(args + ["--disc_class_conditional"]) == 2
    assert "disc_class_conditional: Stable Diffusion is text-conditioned" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="validation_class_labels"):
        StableDiffusionAdapter.check_config(build_config({
            "pretrained_model_name_or_path": "x", "train_data_dir": "d", "validation_class_labels": [1]}))


@pytest.mark.slow
def test_full_fine_tune_v_prediction_exports_a_stock_pipeline(tmp_path):
    base = build_tiny_sd_pipeline(tmp_path / "base", prediction_type="v_prediction")
    data = build_captioned_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=3) + [
        "--snr_gamma", "5", "--noise_offset", "0.05", "--gradient_checkpointing", "--validation_steps", "2",
        "--validation_prompts", "a red square", "a blue circle"]
    proc = accelerate_launch(args, offline_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.safety_checker is None and pipe.config.requires_safety_checker is False
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    trained, original = (load_file(str(p / "unet" / "diffusion_pytorch_model.safetensors")) for p in (out, base))
    assert trained.keys() == original.keys()
    assert max((trained[k] - original[k]).abs().max().item() for k in trained) > 1e-4  # trained, beyond rounding
    # The frozen parts are copied, never computed: bit for bit.
    for frozen in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(out / frozen)), load_file(str(base / frozen))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert {"step-2.png", "final.png"} <= {p.name for p in (out / "samples").iterdir()}
    card = (out / "README.md").read_text()
    assert "stable-diffusion" in yaml.safe_load(card.split("---")[1])["tags"]
    images = pipe(["a red square"], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3)
