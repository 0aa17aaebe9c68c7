"""Stable Diffusion 3 / 3.5 family: the flow-matching process against the scheduler's own step, three text encoders
(T5 optional) as the pipeline encodes them, the VAE's shift, one-line refusals, and a full fine-tune with SADM
(accelerate launch) and a LoRA run without it, both reloaded by stock diffusers."""

import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from safetensors import safe_open
from safetensors.torch import load_file

from launch import accelerate_launch, offline_env, tiny_run_args, train_in_process
from sadm_finetune.cli import main
from sadm_finetune.config.run import ModelConfig, RunConfig, TrainingConfig, build_config
from sadm_finetune.terms.sadm.config import SADMConfig
from sadm_finetune.utils.errors import ConfigError
from sadm_finetune.diffusion.flow_config import FlowMatchingConfig
from sadm_finetune.diffusion.latents import encode
from sadm_finetune.families.loading import _supported, load_family
from sadm_finetune.families.sd3 import StableDiffusion3Adapter
from sadm_finetune.diffusion.process import FlowMatchProcess, make_process
from sadm_finetune.terms.sadm.objective import SADMObjective
from tiny_sd import CAPTIONS, build_captioned_folder, build_tiny_sd_pipeline
from tiny_sd3 import SCALING_FACTOR, SHIFT, SHIFT_FACTOR, build_tiny_sd3_pipeline

CPU = torch.device("cpu")


def _process(**options) -> FlowMatchProcess:
    return FlowMatchProcess(FlowMatchEulerDiscreteScheduler(shift=SHIFT).config, "cpu", FlowMatchingConfig(**options))


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "base")


@pytest.fixture(scope="module")
def adapter(tiny_sd3):
    return load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_sd3), caption_dropout_prob=0.5))


# -- the flow-matching process ------------------------------------------------------------------------------
def test_timesteps_follow_diffusers_sd3_recipe_with_the_steps_generator():
    process, n = _process(weighting_scheme="logit_normal", logit_mean=0.5, logit_std=1.5), 1000
    t = process.sample_timesteps(64, torch.Generator().manual_seed(3), CPU)
    u = compute_density_for_timestep_sampling("logit_normal", 64, 0.5, 1.5, device="cpu",
                                              generator=torch.Generator().manual_seed(3))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    indices = (u * n).long()
    assert torch.equal(t, scheduler.timesteps[indices])
    assert torch.equal(process.sigma(t), scheduler.sigmas[indices])  # the shifted sigmas: shift 3 moves them up
    assert (process.sigma(t) > scheduler.timesteps[indices] / n - 1e-6).all() and process.sigma(t).max() > 0.5
    again = process.sample_timesteps(64, torch.Generator().manual_seed(3), CPU)
    assert torch.equal(t, again) and not torch.equal(t, process.sample_timesteps(64, torch.Generator(), CPU))
    mode = _process(weighting_scheme="mode").sample_timesteps(512, torch.Generator().manual_seed(0), CPU)
    assert torch.isin(mode, scheduler.timesteps).all()  # u = 1 is clamped to the last index, never past it


def test_noising_target_x0_hat_and_snr_formulas():
    process = _process()
    t = process.timesteps[torch.tensor([0, 400, 999])]
    sigma = process.sigma(t).view(-1, 1, 1, 1)
    z0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    x_t = process.add_noise(z0, eps, t)
    torch.testing.assert_close(x_t, (1 - sigma) * z0 + sigma * eps)
    torch.testing.assert_close(process.target(z0, eps, t), eps - z0)
    torch.testing.assert_close(process.x0_hat(eps - z0, x_t, t), z0, atol=1e-5, rtol=0)  # the exact velocity
    s = sigma.flatten()
    torch.testing.assert_close(process.snr(t), ((1 - s) / s) ** 2)
    assert process.snr(t)[0] < 1e-6 and process.snr(t)[2] > 1e4  # sigma 1: pure noise; sigma ~ 0: clean


def test_x0_hat_is_the_schedulers_own_euler_step_to_sigma_zero():
    process = _process()
    for index in (0, 250, 700, 999):
        t = process.timesteps[index:index + 1]
        x_t, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
        scheduler.timesteps, scheduler.sigmas = t, torch.cat([process.sigma(t), torch.zeros(1)])
        scheduler._step_index = 0
        stepped = scheduler.step(v, t[0], x_t).prev_sample
        torch.testing.assert_close(process.x0_hat(v, x_t, t), stepped)


def test_loss_weighting_renoise_and_refusals():
    process = _process(weighting_scheme="sigma_sqrt")
    t = process.timesteps[torch.tensor([100, 900])]
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    loss = process.diffusion_loss(TrainingConfig())(pred, target, t)
    torch.testing.assert_close(loss, process.sigma(t) ** -2)  # MSE 1, weight sigma^-2
    plain = _process().diffusion_loss(TrainingConfig())(pred, target, t)
    assert torch.equal(plain, torch.ones(2))
    from sadm_finetune.families.sd3 import StableDiffusion3Adapter

    with pytest.raises(ConfigError, match="^snr_gamma: "):  # refused once, by the capability check, before loading
        StableDiffusion3Adapter.check_config(RunConfig(training=TrainingConfig(snr_gamma=5.0)))
    z0, x0_hat = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    real, fake, t_disc = process.renoise(z0, x0_hat, t, 0.5, torch.Generator().manual_seed(0))
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    s = 0.5 * process.sigma(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(real, (1 - s) * z0 + s * eps)
    torch.testing.assert_close(fake, (1 - s) * x0_hat + s * eps)
    torch.testing.assert_close(t_disc, s.flatten() * 1000)
    # SADM's min-SNR structure weights read the flow SNR.
    weights = SADMObjective(SADMConfig(timestep_weighting="min_snr", structure_snr_gamma=5.0), process).sample_weights(t)
    torch.testing.assert_close(weights, torch.clamp(process.snr(t), max=5.0) / 5.0)


def test_default_timestep_density_is_the_sd3_scripts_logit_normal(tiny_sd3):
    """build_config gives an SD3 pipeline its script's defaults: timesteps drawn logit-normal (mass in the middle of
    the schedule), not uniform; `--weighting_scheme none` still gives uniform."""
    def positions(options):  # where 20,000 drawn timesteps sit in the schedule, 0..999
        config = build_config({"pretrained_model_name_or_path": str(tiny_sd3), "train_data_dir": "d", **options})
        process = FlowMatchProcess(FlowMatchEulerDiscreteScheduler(shift=SHIFT).config, "cpu", config.flow_matching)
        t = process.sample_timesteps(20_000, torch.Generator().manual_seed(0), CPU)
        return (process.timesteps[None, :] == t[:, None]).int().argmax(dim=1).float()

    default = positions({})
    middle = ((default >= 333) & (default < 667)).float().mean()
    assert middle > 0.47, middle  # logit-normal(0, 1): P(|z| < logit(2/3)) = 0.51; uniform: 0.33
    assert (default < 100).float().mean() < 0.03 and (default >= 900).float().mean() < 0.03  # 0.014 each; uniform 0.1
    uniform = positions({"weighting_scheme": "none"})
    assert abs(((uniform >= 333) & (uniform < 667)).float().mean() - 1 / 3) < 0.02
    assert abs((uniform < 100).float().mean() - 0.1) < 0.01


@pytest.mark.parametrize("scheme", ["logit_normal", "sigma_sqrt"])
def test_preconditioned_loss_is_the_sd3_scripts_formula(scheme):
    """train_dreambooth_lora_sd3.py: model_pred = model_pred * (-sigmas) + noisy_model_input, target = model_input,
    loss = mean(weighting * (model_pred - target)^2) per sample."""
    process = _process(weighting_scheme=scheme, precondition_outputs=True)
    t = process.timesteps[torch.tensor([0, 150, 500, 850, 999])]
    z0, eps, v_hat = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    x_t = process.add_noise(z0, eps, t)
    sigmas = process.sigma(t).view(-1, 1, 1, 1)
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas)
    hand = (weighting * (v_hat * (-sigmas) + x_t - z0) ** 2).reshape(5, -1).mean(dim=1)
    ours = process.diffusion_loss(TrainingConfig())(v_hat, process.target(z0, eps, t), t)
    torch.testing.assert_close(ours, hand, rtol=1e-5, atol=1e-7)
    plain = _process(weighting_scheme=scheme).diffusion_loss(TrainingConfig())(v_hat, process.target(z0, eps, t), t)
    torch.testing.assert_close(ours, plain * sigmas.flatten() ** 2)  # the velocity loss weighted by sigma^2
    # The prediction converted to clean latents is what the loss compares with the latents.
    x0_hat = process.x0_hat(v_hat, x_t, t)
    torch.testing.assert_close(ours, (weighting * (x0_hat - z0) ** 2).reshape(5, -1).mean(dim=1), rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("precondition", [False, True])
def test_a_perfect_prediction_gives_the_latents_and_zero_loss_in_both_modes(precondition):
    process = _process(weighting_scheme="logit_normal", precondition_outputs=precondition)
    t = process.sample_timesteps(16, torch.Generator().manual_seed(1), CPU)
    z0, eps = torch.randn(16, 4, 8, 8), torch.randn(16, 4, 8, 8)
    x_t, perfect = process.add_noise(z0, eps, t), eps - z0  # the exact velocity
    torch.testing.assert_close(process.x0_hat(perfect, x_t, t), z0, atol=1e-5, rtol=0)  # SADM's x0_hat: the same
    assert torch.equal(process.target(z0, eps, t), perfect)
    loss = process.diffusion_loss(TrainingConfig())
    assert loss(perfect, process.target(z0, eps, t), t).abs().max() == 0
    assert (loss(perfect + 0.1, process.target(z0, eps, t), t) > 0).all()


# -- the adapter --------------------------------------------------------------------------------------------
def test_loads_as_the_sd3_family(adapter, tiny_sd3):
    p = adapter.pipeline
    assert isinstance(adapter, StableDiffusion3Adapter) and adapter.denoiser is p.transformer
    assert adapter.frozen_modules() == [adapter.vae, p.text_encoder, p.text_encoder_2, p.text_encoder_3]
    assert adapter.default_resolution() == 32 and adapter.aspect_ratio_bucket_multiple() == 8
    # tokens are 2x2 latent patches: the dynamic shift counts them as StableDiffusion3Pipeline does
    assert adapter.latent_patch_size == adapter.denoiser.config.patch_size == 2
    assert isinstance(make_process(p.scheduler.config, "cpu"), FlowMatchProcess)
    assert "StableDiffusion3Pipeline" in _supported()
    with pytest.raises(ConfigError, match=r"resolution: 36 is not divisible by 8 \(VAE factor 4 x patch size 2\)"):
        adapter.check_resolution(36)
    with pytest.raises(ConfigError, match="at most 64"):
        adapter.check_resolution(72)  # pos_embed_max_size 8 patches of 8 pixels


def test_clean_latents_apply_the_vaes_shift_then_scale(adapter):
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    z = encode(adapter.vae, pixels, torch.Generator().manual_seed(0))
    raw = adapter.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, (raw - SHIFT_FACTOR) * SCALING_FACTOR)


@pytest.mark.parametrize("with_t5", [True, False])
def test_encode_text_is_the_pipelines_encode_prompt(tmp_path, adapter, with_t5):
    if not with_t5:
        adapter = load_family(ModelConfig(pretrained_model_name_or_path=str(
            build_tiny_sd3_pipeline(tmp_path / "no-t5", with_t5=False))))
        assert adapter.pipeline.text_encoder_3 is None and set(adapter.tokenizers()) == {"tokenizer", "tokenizer_2"}
    prompts = list(CAPTIONS[:3])
    with torch.no_grad():  # T5's attention takes another kernel with autograd on (1e-6 apart)
        embeds, _, pooled, _ = adapter.pipeline.encode_prompt(prompts, None, None, device="cpu",
                                                               do_classifier_free_guidance=False)
    encoded = adapter.encode_text(prompts, CPU)
    assert embeds.shape == (3, 16 + 256, 64) and pooled.shape == (3, 64)
    torch.testing.assert_close(encoded["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(encoded["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    assert (embeds[:, 16:].abs().max() > 0) == with_t5  # no T5: zeros in its place, as the pipeline does
    cond = adapter.conditioning({"captions": prompts, "pixel_values": torch.zeros(3, 3, 32, 32)}, CPU,
                                torch.float32, drop=False)
    # The batch is encoded with the empty prompt (one encoder pass): other batch sizes, other matmul rounding.
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["pooled_projections"], pooled)


def test_caption_dropout_and_the_image_tokens_the_terms_read(adapter):
    batch = {"captions": [CAPTIONS[0]] * 32, "pixel_values": torch.zeros(32, 3, 32, 32)}
    cond = adapter.conditioning(batch, CPU, torch.float32, drop=True, generator=torch.Generator().manual_seed(0))
    empty = adapter.encode_text([""], CPU)
    def is_empty(values, name):
        return [torch.allclose(v, empty[name][0], atol=1e-5) for v in values]

    dropped = is_empty(cond["encoder_hidden_states"], "prompt_embeds")
    assert dropped == is_empty(cond["pooled_projections"], "pooled_prompt_embeds")
    assert 4 < sum(dropped) < 28  # p = 0.5
    t = _process().timesteps[torch.tensor([10, 600])]
    small = {k: v[:2] for k, v in cond.items()}
    with adapter.capture_hidden(adapter.denoiser, (0, 1)) as hidden:
        pred = adapter.predict(adapter.denoiser, torch.randn(2, 4, 8, 8), t, small).model_pred
    assert pred.shape == (2, 4, 8, 8)
    assert hidden[0].shape == hidden[1].shape == (2, 16, 32)  # 4x4 image tokens, not the 272 text tokens


def test_incompatible_options_are_refused_in_one_line_before_loading(tiny_sd3, tmp_path, capsys):
    args = ["--pretrained", str(tiny_sd3), "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    for flags, field in ((["--snr_gamma", "5"], "snr_gamma"), (["--disc_class_conditional"], "disc_class_conditional"),
                         (["--sddit_weight", "0.1"], "sddit_weight"), (["--trainable", "difffit"], "trainable")):
        assert main(args + flags) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"sadm-train: error: {field}: ") and len(err.splitlines()) == 1, err
    sd = build_tiny_sd_pipeline(tmp_path / "sd")  # a DDPM family refuses the flow-matching options
    capsys.readouterr()
    for flag, field in ((["--weighting_scheme", "logit_normal"], "weighting_scheme"),
                        (["--precondition_outputs"], "precondition_outputs")):
        assert main(["--pretrained", str(sd), *args[2:], *flag]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"sadm-train: error: {field}: ") and f"drop --{field}" in err, err
        assert len(err.splitlines()) == 1


# -- end to end ---------------------------------------------------------------------------------------------
def _changed(out, base, name="transformer/diffusion_pytorch_model.safetensors"):
    trained, original = load_file(str(out / name)), load_file(str(base / name))
    assert trained.keys() == original.keys()
    return max((trained[k] - original[k]).abs().max().item() for k in trained)


@pytest.mark.slow
def test_full_fine_tune_with_sadm_ema_and_caches_exports_a_stock_pipeline(tiny_sd3, tmp_path, stock_diffusers):
    data = build_captioned_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny_run_args(tiny_sd3, data, out, steps=2) + [
        "--weighting_scheme", "logit_normal", "--use_ema", "--ema_decay", "0.5", "--cache_latents", "--center_crop",
        "--latent_cache_dir", str(tmp_path / "latents"), "--cache_text_embeddings", "--text_cache_dir",
        str(tmp_path / "text"), "--disc_renoise", "0.5", "--validation_prompts", "a red square", "--report_to", "none"]
    proc = accelerate_launch(args, offline_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SADM: lambda 0.01" in proc.stdout
    # The SD3 script's defaults where the command line is silent (the weighting scheme is given, so it is not listed).
    assert "family defaults (docs/defaults.md; set them to override): adam_weight_decay 0.0001, precondition_outputs " \
        "True" in proc.stdout
    saved = yaml.safe_load((out / "training_config.yaml").read_text())["flow_matching"]
    assert saved["precondition_outputs"] is True and saved["weighting_scheme"] == "logit_normal"
    assert _changed(out, tiny_sd3) > 1e-5  # trained (EMA-averaged), beyond rounding
    for encoder in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # released for the cache, back bit for bit
        a, b = (load_file(str(p / encoder / "model.safetensors")) for p in (out, tiny_sd3))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "samples" / "final.png").is_file() and (out / "structure_discriminator").is_dir()
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert {"stable-diffusion-3", "sd3", "sd3-diffusers", "text-to-image", "sadm"} <= set(card["tags"])
    seen = stock_diffusers.load(out, prompts=["a red square"])
    assert seen == {"cls": "StableDiffusion3Pipeline", "labels": None, "shape": [1, 32, 32, 3], "finite": True,
                    "sadm_finetune_imported": False}, seen.get("error")


@pytest.mark.slow
def test_lora_without_sadm_pushes_the_lora_alone_and_stock_load_lora_weights_reads_it(tiny_sd3, tmp_path,
                                                                                       stock_diffusers, fake_hub):
    data = build_captioned_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny_run_args(tiny_sd3, data, out, steps=2) + [
        "--trainable", "lora", "--lora_rank", "4", "--learning_rate", "1e-2", "--structure_weight", "0",
        "--weighting_scheme", "sigma_sqrt", "--gradient_checkpointing", "--report_to", "none",
        "--push_to_hub", "--hub_model_id", "org/sd3-lora"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SADM: off" in proc.stdout
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys)
    assert any(".attn.add_q_proj." in k for k in keys) and any(".attn2.to_q." in k for k in keys)  # SD3.5 traits
    # Lean: no merged pipeline (diffusers loads SD3 LoRAs), no kohya file (a UNet format); the push carries the same.
    stored = set(fake_hub.repo_files("org/sd3-lora"))
    assert stored == {"README.md", "pytorch_lora_weights.safetensors", "training_config.yaml", "samples/final.png",
                      "samples/final-0.png", "samples/final-1.png", "samples/final-2.png", "samples/final-3.png"}
    assert not (out / "model_index.json").exists() and not (out / "transformer").exists()
    card = (out / "README.md").read_text()
    assert "pipe = StableDiffusion3Pipeline.from_pretrained(" in card
    assert 'pipe.load_lora_weights("org/sd3-lora"' in card and "pipe(\"a red square\"" in card

    seen = stock_diffusers.load(tiny_sd3, prompts=["a red square"], lora=out)
    assert seen.get("error") is None, seen["error"]
    assert seen["cls"] == "StableDiffusion3Pipeline" and not seen["sadm_finetune_imported"]
    assert seen["lora_change"] > 1e-3

    # sadm-eval takes the lean folder as --pipeline: the base from training_config.yaml plus the LoRA file
    from sadm_finetune.evaluation.evaluate import load_pipeline

    pipe = load_pipeline(str(out), "--pipeline", "cpu", "float32")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.get_list_adapters() == {"transformer": ["default_0"]}
