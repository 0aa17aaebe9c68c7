"""Flux.1 family: packed 2x2 latents and their ids against FluxPipeline's own functions, text encoding as the
pipeline's encode_prompt, the scheduler's dynamic shift, the guidance value reaching the transformer, one-line
refusals, and two runs through `accelerate launch` (LoRA with SADM, REPA, buckets and cached text, which stock
load_lora_weights applies to the base; a full fine-tune with SADM off, whose export stock DiffusionPipeline loads and
samples), each read in a process that never imports sadm_finetune. (SD-DiT is refused for Flux: no class-conditional
encoder blocks.)"""

import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors import safe_open

from launch import launch_lora_and_full, weights_changed
from sadm_finetune.cli import main
from sadm_finetune.config.run import ModelConfig, build_config
from sadm_finetune.utils.errors import ConfigError
from sadm_finetune.diffusion.latents import encode
from sadm_finetune.families.flux import FluxAdapter, pack, unpack
from sadm_finetune.families.loading import load_family
from sadm_finetune.diffusion.process import FlowMatchProcess, make_process
from tiny_flux import SCALING_FACTOR, SCHEDULER, SHIFT_FACTOR, build_tiny_flux_pipeline
from tiny_sd import CAPTIONS
from tiny_sd3 import build_tiny_sd3_pipeline
from tiny_encoders import build_tiny_encoder, repa_args

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "base")


@pytest.fixture(scope="module")
def adapter(tiny_flux):
    return load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_flux), caption_dropout_prob=0.5))


def test_packing_round_trip_and_the_pipelines_ids(adapter):
    z = torch.randn(2, 4, 6, 10)
    packed = pack(z)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 4, 6, 10)) and packed.shape == (2, 15, 16)
    assert torch.equal(unpack(packed, 6, 10), z)
    assert torch.equal(unpack(packed, 6, 10), FluxPipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8))
    # token (i, j) holds latent pixels (2i..2i+1, 2j..2j+1) of every channel, as its id (0, i, j) says
    assert torch.equal(packed[0, 1 * 5 + 3].view(4, 2, 2), z[0, :, 2:4, 6:8])
    assert isinstance(adapter, FluxAdapter) and adapter.aspect_ratio_bucket_multiple() == 8


def test_encode_text_is_the_pipelines_encode_prompt_and_latents_shift_then_scale(adapter):
    prompts = list(CAPTIONS[:3])
    with torch.no_grad():  # T5's attention takes another kernel with autograd on
        embeds, pooled, text_ids = adapter.pipeline.encode_prompt(prompts, None, device="cpu")
    encoded = adapter.encode_text(prompts, CPU)
    assert embeds.shape == (3, 512, 32) and pooled.shape == (3, 32)  # T5 at the pipeline's max_sequence_length
    torch.testing.assert_close(encoded["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(encoded["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    assert not text_ids.any()  # the zero text ids predict uses
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    z = encode(adapter.vae, pixels, torch.Generator().manual_seed(0))
    raw = adapter.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, (raw - SHIFT_FACTOR) * SCALING_FACTOR)


def test_dynamic_shift_from_the_token_count_and_x0_hat_of_a_perfect_prediction(tiny_flux, adapter):
    config = build_config({"pretrained_model_name_or_path": str(tiny_flux), "train_data_dir": "d"})
    assert config.flow_matching.weighting_scheme == "none" and config.model.guidance_scale == 3.5
    assert config.training.adam_weight_decay == 1e-4  # the Flux script's defaults
    process = make_process(adapter.pipeline.scheduler.config, "cpu", config.flow_matching,
                           adapter.latent_patch_size)
    assert isinstance(process, FlowMatchProcess) and process.dynamic_shift
    shape = (8, 4, 64, 128)  # 32 x 64 = 2048 tokens
    t = process.sample_timesteps(8, torch.Generator().manual_seed(0), CPU, shape)
    mu = calculate_shift(2048, 256, 4096, 0.5, 1.15)
    assert process.mu(shape) == pytest.approx(mu)
    u = torch.rand(8, generator=torch.Generator().manual_seed(0))  # "none": uniform u, as the script draws it
    base = process.sigmas[(u * 1000).long()]
    shifted = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / base - 1))
    torch.testing.assert_close(process.sigma(t), shifted)
    assert (process.sigma(t) > base).all()  # mu > 0 moves every sigma towards noise
    small = process.sample_timesteps(8, torch.Generator().manual_seed(0), CPU, (8, 4, 32, 32))
    assert (process.sigma(small) < process.sigma(t)).all()  # fewer tokens, less shift
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)  # the pipeline's own shift of a sampling sigma
    scheduler.set_timesteps(sigmas=[0.5], mu=mu)
    torch.testing.assert_close(process.scheduler.time_shift(mu, 1.0, torch.tensor([0.5])), scheduler.sigmas[:1])
    z0, eps = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    x_t = process.add_noise(z0, eps, t)
    torch.testing.assert_close(process.x0_hat(eps - z0, x_t, t), z0, atol=1e-5, rtol=0)


def test_the_guidance_value_reaches_the_transformer_and_hooks_read_image_tokens(adapter):
    seen = []
    handle = adapter.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["guidance"]), with_kwargs=True)
    batch = {"captions": [CAPTIONS[0]] * 2, "pixel_values": torch.zeros(2, 3, 32, 32)}
    cond = adapter.conditioning(batch, CPU, torch.float32, drop=False)
    t, x = torch.tensor([900.0, 200.0]), torch.randn(2, 4, 8, 8)
    try:
        with adapter.capture_hidden(adapter.denoiser, (0, 1)) as hidden:
            out = adapter.predict(adapter.denoiser, x, t, cond).model_pred
        other = adapter.predict(adapter.denoiser, x, t, {**cond, "guidance": cond["guidance"] * 0}).model_pred
    finally:
        handle.remove()
    assert torch.equal(seen[0], torch.tensor([3.5, 3.5])) and out.shape == (2, 4, 8, 8)
    assert hidden[0].shape == hidden[1].shape == (2, 16, 32)  # the dual and the single block's 4x4 image tokens
    assert not torch.allclose(out, other)
    adapter.config.guidance_scale = 7.0
    try:
        assert torch.equal(adapter.conditioning(batch, CPU, torch.float32, drop=False)["guidance"],
                           torch.tensor([7.0, 7.0]))
    finally:
        adapter.config.guidance_scale = None


def test_schnell_has_no_guidance_input_and_buckets_predict_on_their_grid(tmp_path):
    schnell = load_family(ModelConfig(pretrained_model_name_or_path=str(
        build_tiny_flux_pipeline(tmp_path / "schnell", guidance=False)), guidance_scale=3.5))
    assert schnell.guidance_scale is None  # as the script: no guidance embedding, no value
    batch = {"captions": [CAPTIONS[1]], "pixel_values": torch.zeros(1, 3, 32, 48)}
    cond = schnell.conditioning(batch, CPU, torch.float32, drop=False)
    assert "guidance" not in cond
    x = torch.randn(1, 4, 8, 12)  # a 32x48 bucket: 4x6 tokens
    with schnell.capture_hidden(schnell.denoiser, (1,)) as hidden:
        out = schnell.predict(schnell.denoiser, x, torch.tensor([500.0]), cond).model_pred
    assert out.shape == x.shape and hidden[1].shape == (1, 24, 32)
    # the pipeline's 2x2 packing is the patch (the transformer's own patch_size is 1): sizes and the shift's tokens
    assert schnell.denoiser.config.patch_size == 1 and schnell.latent_patch_size == 2
    with pytest.raises(ConfigError, match=r"resolution: 36 is not divisible by 8 \(VAE factor 4 x patch size 2\)"):
        schnell.check_resolution(36)


def test_refusals_are_one_line_before_loading(tiny_flux, tmp_path, capsys):
    args = ["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    sd3 = build_tiny_sd3_pipeline(tmp_path / "sd3")
    for base, flags, field in ((tiny_flux, ["--sddit_weight", "0.1"], "sddit_weight"),
                               (tiny_flux, ["--snr_gamma", "5"], "snr_gamma"),
                               (sd3, ["--guidance_scale", "3.5"], "guidance_scale")):
        capsys.readouterr()
        assert main(["--pretrained", str(base), *args, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"sadm-train: error: {field}: ") and len(err.splitlines()) == 1, err


# -- end to end: `accelerate launch`, each export read by a process that never imports sadm_finetune ----------------
@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_flux):
    """A LoRA with SADM, REPA, buckets and cached text, and a full fine-tune with SADM off, launched side by side."""
    tmp = tmp_path_factory.mktemp("launched")
    return launch_lora_and_full(tmp, tiny_flux, [*repa_args(build_tiny_encoder(tmp / "encoder"), depth=2)])  # REPA on the single-stream block


@pytest.mark.slow
def test_launched_lora_with_sadm_repa_buckets_and_cached_text_is_read_by_stock_load_lora_weights(tiny_flux, launched,
                                                                                                 stock_diffusers):
    out, proc = launched["lora"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SADM: lambda" in proc.stdout and "REPA: lambda 0.5, block 2" in proc.stdout
    assert "family defaults (docs/defaults.md; set them to override): adam_weight_decay 0.0001, guidance_scale " \
        "3.5" in proc.stdout
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any("single_transformer_blocks.0.attn.to_q." in k for k in keys) and any(".ff_context.net.2." in k
                                                                                    for k in keys)
    assert not (out / "model_index.json").exists()  # lean: diffusers loads Flux LoRAs
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert {"flux", "flux-diffusers", "sadm"} <= set(card["tags"])
    seen = stock_diffusers.load(tiny_flux, prompts=["a red square"], lora=out)  # the base + the file, stock
    assert seen.get("error") is None, seen["error"]
    assert seen["cls"] == "FluxPipeline" and not seen["sadm_finetune_imported"] and seen["finite"]
    assert seen["shape"] == [1, 512, 512, 3] and seen["lora_change"] > 1e-3  # FluxPipeline's default size


@pytest.mark.slow
def test_launched_full_fine_tune_without_sadm_exports_a_pipeline_stock_diffusers_samples(tiny_flux, launched,
                                                                                       stock_diffusers):
    out, proc = launched["full"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SADM: off" in proc.stdout and weights_changed(out, tiny_flux) > 1e-5  # trained (EMA-averaged)
    assert yaml.safe_load((out / "transformer" / "config.json").read_text())["guidance_embeds"]
    seen = stock_diffusers.load(out, prompts=["a red square"])
    assert seen == {"cls": "FluxPipeline", "labels": None, "shape": [1, 512, 512, 3], "finite": True,
                    "sadm_finetune_imported": False}, seen.get("error")
