"""Qwen-Image family: text encoding as QwenImagePipeline's encode_prompt (the template's system prefix dropped, the
mask, padding that changes nothing), the 3D VAE's normalised one-frame latents as the script and the pipeline make
them, packed 2x2 latents and the transformer call as the script's, the scheduler's dynamic shift, one-line
refusals, and two runs through `accelerate launch` (LoRA with SADM, REPA, buckets and cached text, which stock
load_lora_weights applies to the base; a full fine-tune with SADM off, whose export stock DiffusionPipeline loads and
samples), each read in a process that never imports sadm_finetune. (SD-DiT is refused for Qwen-Image: no
class-conditional encoder blocks.)"""

import numpy as np
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from safetensors import safe_open

from launch import launch_lora_and_full, weights_changed
from sadm_finetune.cli import main
from sadm_finetune.config.run import ModelConfig, build_config
from sadm_finetune.diffusion.latents import decode, encode, sample_latents
from sadm_finetune.diffusion.process import FlowMatchProcess, make_process
from sadm_finetune.families.loading import load_family
from sadm_finetune.families.qwen_image import QwenImageAdapter, pack, trim_text, unpack
from tiny_encoders import build_tiny_encoder, repa_args
from tiny_qwen_image import LATENTS_MEAN, LATENTS_STD, SCHEDULER, build_tiny_qwen_image_pipeline

CPU = torch.device("cpu")
PROMPTS = ["a red square", "a small bright green triangle on the grass", ""]  # 3, 8 and 0 words


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_tiny_qwen_image_pipeline(tmp_path_factory.mktemp("qwen") / "base")


@pytest.fixture(scope="module")
def adapter(tiny_qwen):
    return load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_qwen), caption_dropout_prob=0.5))


def test_encode_text_is_encode_prompt_with_the_system_prefix_dropped_and_padding_that_changes_nothing(adapter):
    p = adapter.pipeline
    assert isinstance(adapter, QwenImageAdapter) and adapter.text_encoder_names == ("text_encoder",)
    encoded = adapter.encode_text(PROMPTS, CPU)
    with torch.no_grad():
        embeds, mask = p.encode_prompt(PROMPTS, device="cpu", max_sequence_length=512)
    n = embeds.shape[1]
    assert encoded["prompt_embeds"].shape == (3, 512, 32) and encoded["prompt_embeds_mask"].dtype == torch.int64
    torch.testing.assert_close(encoded["prompt_embeds"][:, :n], embeds, rtol=0, atol=0)
    assert torch.equal(encoded["prompt_embeds_mask"][:, :n], mask) and not encoded["prompt_embeds_mask"][:, n:].any()
    assert not encoded["prompt_embeds"][:, n:].any()
    # By hand: the last hidden states of the templated prompt without its 34-token system prompt, the user's words
    # then the template's tail (<|im_end|> \n <|im_start|> assistant \n).
    ids = p.tokenizer(p.prompt_template_encode.format(PROMPTS[1]), return_tensors="pt").input_ids
    assert p.prompt_template_encode_start_idx == 34
    assert p.tokenizer.decode(ids[0, :34]).endswith("<|im_start|>user\n")
    with torch.no_grad():
        hidden = p.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, 34:]
    assert encoded["prompt_embeds_mask"].sum(1).tolist() == [3 + 5, 8 + 5, 5] and hidden.shape[0] == 13
    torch.testing.assert_close(encoded["prompt_embeds"][1, :13], hidden, rtol=1e-5, atol=1e-5)
    # The batch cut to its longest prompt (13 tokens) predicts what the 512-token padding predicts, and what each
    # prompt alone (no padding, no mask: the pipeline's own call for one prompt) predicts.
    cut = trim_text(encoded["prompt_embeds"], encoded["prompt_embeds_mask"])
    assert cut["encoder_hidden_states"].shape == (3, 13, 32) and cut["encoder_hidden_states_mask"].shape == (3, 13)
    x, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900.0, 500.0, 100.0])
    with torch.no_grad():
        out = adapter.predict(adapter.denoiser, x, t, cut).model_pred
        padded = adapter.predict(adapter.denoiser, x, t, {
            "encoder_hidden_states": encoded["prompt_embeds"],
            "encoder_hidden_states_mask": encoded["prompt_embeds_mask"]}).model_pred
        alone = adapter.predict(adapter.denoiser, x[:1], t[:1], trim_text(encoded["prompt_embeds"][:1],
                                                                          encoded["prompt_embeds_mask"][:1])).model_pred
    torch.testing.assert_close(out, padded, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:1], alone, rtol=1e-4, atol=1e-5)
    same = trim_text(encoded["prompt_embeds"][:1].expand(2, -1, -1), encoded["prompt_embeds_mask"][:1].expand(2, -1))
    assert same["encoder_hidden_states_mask"] is None  # no padding in the cut: no mask, as encode_prompt does


def test_the_3d_vae_latents_are_the_scripts_normalised_frame_and_decode_as_the_pipeline(adapter):
    vae = adapter.pipeline.vae
    assert adapter.vae.model is vae and adapter.latent_channels == 4 and adapter.vae_scale_factor == 4
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    z = encode(adapter.vae, pixels, torch.Generator().manual_seed(0))
    # train_dreambooth_lora_qwen_image.py: vae.encode(pixels with a frame axis).latent_dist.sample(), then
    # (z - latents_mean) * (1 / latents_std); the frame axis is dropped for the loop, the terms and D.
    raw = vae.encode(pixels[:, :, None]).latent_dist.sample(torch.Generator().manual_seed(0))
    mean = torch.tensor(LATENTS_MEAN).view(1, 4, 1, 1, 1)
    expected = ((raw - mean) * (1.0 / torch.tensor(LATENTS_STD).view(1, 4, 1, 1, 1)))[:, :, 0]
    assert z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    # A cached posterior (the latent cache stores latent_dist's mean and std) draws the same latents.
    posterior = adapter.vae.encode(pixels).latent_dist
    cached = sample_latents(adapter.vae, posterior.mean, posterior.std, torch.Generator().manual_seed(0))
    assert torch.equal(cached, z)
    # decode: QwenImagePipeline.__call__'s un-normalisation, the frame added back, frame 0 of the video.
    with torch.no_grad():
        video = vae.decode(z[:, :, None] / (1.0 / torch.tensor(LATENTS_STD).view(1, 4, 1, 1, 1)) + mean).sample
    torch.testing.assert_close(decode(adapter.vae, z), video[:, :, 0], rtol=0, atol=0)


def test_packing_the_transformer_call_and_the_dynamic_shift_are_the_scripts_and_the_pipelines(tiny_qwen, adapter):
    z = torch.randn(2, 4, 6, 10)
    assert torch.equal(pack(z), QwenImagePipeline._pack_latents(z[:, None], 2, 4, 6, 10))  # prepare_latents' packing
    assert torch.equal(unpack(pack(z), 6, 10), z)
    assert torch.equal(unpack(pack(z), 6, 10), QwenImagePipeline._unpack_latents(pack(z), 24, 40, 4)[:, :, 0])
    assert adapter.aspect_ratio_bucket_multiple() == 8 and adapter.default_resolution() == 512  # 128 x factor 4
    # predict is the script's call: 5D latents permuted and packed, img_shapes, timestep / 1000, the mask.
    batch = {"captions": [PROMPTS[0], PROMPTS[1]], "pixel_values": torch.zeros(2, 3, 24, 40)}
    cond = adapter.conditioning(batch, CPU, torch.float32, drop=False)
    assert cond["encoder_hidden_states_mask"] is not None  # two prompt lengths: the shorter one is padded
    x, t = torch.randn(2, 4, 6, 10), torch.tensor([700.0, 300.0])
    with torch.no_grad(), adapter.capture_hidden(adapter.denoiser, (0, 1)) as hidden:
        ours = adapter.predict(adapter.denoiser, x, t, cond).model_pred
    five = x[:, :, None].permute(0, 2, 1, 3, 4)  # the script's (B, C, 1, h, w) -> (B, 1, C, h, w)
    with torch.no_grad():
        theirs = adapter.denoiser(
            hidden_states=QwenImagePipeline._pack_latents(five, 2, 4, 6, 10), timestep=t / 1000,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_hidden_states_mask=cond["encoder_hidden_states_mask"], img_shapes=[(1, 3, 5)] * 2,
            return_dict=False)[0]
    assert torch.equal(ours, QwenImagePipeline._unpack_latents(theirs, 24, 40, 4)[:, :, 0])
    assert hidden[0].shape == hidden[1].shape == (2, 15, 32)  # both blocks' 3x5 image tokens

    config = build_config({"pretrained_model_name_or_path": str(tiny_qwen), "train_data_dir": "d"})
    assert config.training.adam_weight_decay == 1e-4 and config.flow_matching.weighting_scheme == "none"
    process = make_process(adapter.pipeline.scheduler.config, "cpu", config.flow_matching, adapter.latent_patch_size)
    assert isinstance(process, FlowMatchProcess) and process.dynamic_shift
    shape = (8, 4, 128, 128)  # 64 x 64 = 4096 tokens
    mu = calculate_shift(4096, 256, 8192, 0.5, 0.9)  # QwenImagePipeline.__call__'s, with Qwen-Image's settings
    assert process.mu(shape) == pytest.approx(mu)
    t = process.sample_timesteps(8, torch.Generator().manual_seed(0), CPU, shape)
    u = torch.rand(8, generator=torch.Generator().manual_seed(0))
    base = process.sigmas[(u * 1000).long()]
    torch.testing.assert_close(process.sigma(t), np.exp(mu) / (np.exp(mu) + (1 / base - 1)))
    scheduler = FlowMatchEulerDiscreteScheduler(**{**SCHEDULER, "shift_terminal": None})  # the pipeline's shift
    scheduler.set_timesteps(sigmas=[0.5], mu=mu)
    torch.testing.assert_close(process.scheduler.time_shift(mu, 1.0, torch.tensor([0.5])), scheduler.sigmas[:1])
    z0, eps = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    x_t = process.add_noise(z0, eps, t)
    assert torch.equal(process.target(z0, eps, t), eps - z0)  # the script's noise - model_input
    torch.testing.assert_close(process.x0_hat(eps - z0, x_t, t), z0, atol=1e-5, rtol=0)


def test_validation_grids_from_cached_text_equal_those_from_prompts_guided_against_the_empty_prompt(adapter, tmp_path):
    from sadm_finetune.data.text_cache import TextEmbeddingCache

    cache = TextEmbeddingCache(tmp_path)
    for prompt in PROMPTS:  # what build_text_cache writes: each prompt's encode_text, without the batch dimension
        cache.write(prompt, {k: v[0] for k, v in adapter.encode_text([prompt], CPU).items()})
    adapter.use_text_cache(cache, CPU)
    adapter.set_resolution(32)
    released = QwenImagePipeline(**{**adapter.pipeline.components, "text_encoder": None})
    released.set_progress_bar_config(disable=True)
    adapter.pipeline.set_progress_bar_config(disable=True)
    try:
        grid = adapter.sample_grid(adapter.pipeline, 2, 2, 4.0, 0, PROMPTS[:2])
        cached = adapter.sample_grid(released, 2, 2, 4.0, 0, PROMPTS[:2])
        unguided = adapter.sample_grid(adapter.pipeline, 2, 2, 1.0, 0, PROMPTS[:2])
        with torch.no_grad():  # the pipeline's own CFG call: true_cfg_scale against the empty negative prompt
            stock = adapter.pipeline(prompt=[PROMPTS[1]] * 2, negative_prompt=[""] * 2, true_cfg_scale=4.0,
                                     height=32, width=32, num_inference_steps=2,
                                     generator=torch.Generator().manual_seed(1), output_type="np").images
    finally:
        adapter.text_cache = adapter.empty_text_embeddings = None
        del adapter.resolution
    assert grid.shape == (2, 2, 32, 32, 3)
    np.testing.assert_allclose(cached, grid, rtol=0, atol=1e-5)
    np.testing.assert_allclose(grid[1], stock, rtol=0, atol=1e-6)
    assert np.abs(unguided - grid).max() > 1e-3  # guidance on: the negative prompt reached the pipeline
    assert "true_cfg_scale=4.0" in adapter.example_call("a", 2, 4.0, 0) and 'negative_prompt=""' in \
        adapter.example_call("a", 2, 4.0, 0)


def test_refusals_are_one_line_before_loading(tiny_qwen, tmp_path, capsys):
    args = ["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    for flags, field in ((["--sddit_weight", "0.1"], "sddit_weight"), (["--snr_gamma", "5"], "snr_gamma"),
                         (["--guidance_scale", "3.5"], "guidance_scale"),
                         (["--pretrained_vae_model_name_or_path", str(tmp_path)], "pretrained_vae_model_name_or_path")):
        capsys.readouterr()
        assert main(["--pretrained", str(tiny_qwen), *args, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"sadm-train: error: {field}: ") and len(err.splitlines()) == 1, err


# -- end to end: `accelerate launch`, each export read by a process that never imports sadm_finetune ----------------
@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_qwen):
    """A LoRA with SADM, REPA, buckets and cached text, and a full fine-tune with SADM off, launched side by side."""
    tmp = tmp_path_factory.mktemp("launched")
    return launch_lora_and_full(tmp, tiny_qwen, ["--cache_latents", "--center_crop", *repa_args(build_tiny_encoder(tmp / "encoder"), depth=2)])  # REPA on the second block


@pytest.mark.slow
def test_launched_lora_with_sadm_repa_buckets_and_cached_text_is_read_by_stock_load_lora_weights(tiny_qwen, launched,
                                                                                                 stock_diffusers):
    out, proc = launched["lora"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SADM: lambda" in proc.stdout and "REPA: lambda 0.5, block 2" in proc.stdout
    assert "family defaults (docs/defaults.md; set them to override): adam_weight_decay 0.0001" in proc.stdout
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys} == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert not (out / "model_index.json").exists()  # lean: diffusers loads Qwen-Image LoRAs
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert {"qwen-image", "qwen-image-diffusers", "sadm"} <= set(card["tags"])
    seen = stock_diffusers.load(tiny_qwen, prompts=["a red square"], lora=out)  # the base + the file, stock
    assert seen.get("error") is None, seen["error"]
    assert seen["cls"] == "QwenImagePipeline" and not seen["sadm_finetune_imported"] and seen["finite"]
    assert seen["shape"] == [1, 512, 512, 3] and seen["lora_change"] > 1e-3  # QwenImagePipeline's default size


@pytest.mark.slow
def test_launched_full_fine_tune_without_sadm_exports_a_pipeline_stock_diffusers_samples(tiny_qwen, launched,
                                                                                       stock_diffusers):
    out, proc = launched["full"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SADM: off" in proc.stdout and weights_changed(out, tiny_qwen) > 1e-5  # trained (EMA-averaged)
    seen = stock_diffusers.load(out, prompts=["a red square"])
    assert seen == {"cls": "QwenImagePipeline", "labels": None, "shape": [1, 512, 512, 3], "finite": True,
                    "sadm_finetune_imported": False}, seen.get("error")
