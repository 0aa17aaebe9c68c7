"""PixArt family: T5 text inputs with their mask, caption dropout, learned sigma, PixArt-α micro-conditioning, checks,
and full and LoRA fine-tunes with SADM end to end (stock diffusers reloads and samples them)."""

import pytest
import torch
import yaml
from accelerate import Accelerator
from PIL import Image
from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
from diffusers.loaders import PeftAdapterMixin
from safetensors import safe_open
from safetensors.torch import load_file

from launch import accelerate_launch, offline_env, tiny_run_args, train_in_process
from sadm_finetune.cli import main
from sadm_finetune.config.run import ModelConfig
from sadm_finetune.utils.errors import ConfigError
from sadm_finetune.families.loading import load_family
from sadm_finetune.families.pixart import PixArtAdapter
from sadm_finetune.data.text_cache import build_text_cache
from tiny_pixart import build_tiny_pixart_pipeline
from tiny_sd import CAPTIONS, build_captioned_folder, build_mixed_aspect_folder

CPU = torch.device("cpu")


class PixArtTransformer2DModelWithLoRA(PixArtTransformer2DModel, PeftAdapterMixin):
    """What the model card tells PixArt users to write: diffusers has no LoRA loader for PixArt."""


@pytest.fixture(scope="module")
def tiny_pixart(tmp_path_factory):
    return build_tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart") / "base")


@pytest.fixture(scope="module")
def adapter(tiny_pixart):
    return load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_pixart), caption_dropout_prob=0.5))


def _batch(n, captions=None, sizes=(32, 32)):
    return {"captions": captions or [CAPTIONS[0]] * n, "pixel_values": torch.zeros(n, 3, *sizes),
            "target_sizes": torch.tensor([sizes] * n)}


def test_loads_as_the_pixart_sigma_family(adapter):
    assert isinstance(adapter, PixArtAdapter) and adapter.denoiser is adapter.pipeline.transformer
    assert adapter.frozen_modules() == [adapter.vae, adapter.pipeline.text_encoder]
    assert adapter.max_sequence_length == 300 and adapter.learned_sigma  # Σ's encode_prompt default; 8 = 2 x 4
    assert adapter.default_resolution() == 256 and adapter.aspect_ratio_bucket_multiple() == 16
    assert adapter.card_tags() == ["pixart-sigma", "pixart-sigma-diffusers", "text-to-image"]
    assert len(adapter.feature_blocks(adapter.denoiser)) == 2
    adapter.check_resolution(48)
    with pytest.raises(ConfigError, match=r"resolution: 40 is not divisible by 16 \(VAE factor 8 x patch size 2\)"):
        adapter.check_resolution(40)


def test_encode_text_is_the_pipelines_encode_prompt(adapter):
    prompts = ["A Red Square ", "a blue circle", ""]  # upper case and spaces: the pipeline lower-cases and strips
    encoded = adapter.encode_text(prompts, CPU)
    embeds, mask, _, _ = adapter.pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                                        clean_caption=False)
    assert embeds.shape == (3, 300, 32) and mask.shape == (3, 300)
    torch.testing.assert_close(encoded["prompt_embeds"], embeds)  # the pipeline's runs with grad: not bitwise
    assert torch.equal(encoded["prompt_attention_mask"], mask) and mask.sum(1).tolist() == [11, 12, 1]
    cond = adapter.conditioning(_batch(3, prompts), CPU, torch.float32, drop=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    assert torch.equal(cond["encoder_attention_mask"], mask) and "resolution" not in cond  # Σ: no micro-conditions


def test_caption_dropout_drops_embeddings_and_mask_together(adapter):
    cond = adapter.conditioning(_batch(64), CPU, torch.float32, drop=True, generator=torch.Generator().manual_seed(0))
    empty, full = (adapter.encode_text([p], CPU) for p in ("", CAPTIONS[0]))
    dropped = [torch.equal(m, empty["prompt_attention_mask"][0]) for m in cond["encoder_attention_mask"]]
    for states, mask, is_dropped in zip(cond["encoder_hidden_states"], cond["encoder_attention_mask"], dropped):
        source = empty if is_dropped else full
        assert torch.equal(mask, source["prompt_attention_mask"][0])
        torch.testing.assert_close(states, source["prompt_embeds"][0], rtol=1e-5, atol=1e-5)
    assert 10 < sum(dropped) < 54  # p = 0.5


def test_learned_sigma_channels_are_the_variance_not_the_prediction(adapter):
    cond = adapter.conditioning(_batch(2), CPU, torch.float32, drop=False)
    noisy, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    out = adapter.predict(adapter.denoiser, noisy, t, cond)
    with torch.no_grad():
        raw = adapter.denoiser(noisy, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                               encoder_attention_mask=cond["encoder_attention_mask"],
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert raw.shape == (2, 8, 4, 4) and out.model_pred.shape == out.variance.shape == (2, 4, 4, 4)
    torch.testing.assert_close(out.model_pred, raw[:, :4])  # what the pipeline keeps: noise_pred.chunk(2)[0]
    torch.testing.assert_close(out.variance, raw[:, 4:])
    # The mask matters: padding tokens are ignored, so the prediction changes when the mask is all ones.
    unmasked = adapter.predict(adapter.denoiser, noisy, t, {**cond, "encoder_attention_mask": torch.ones(2, 300)})
    assert (unmasked.model_pred - out.model_pred).abs().max() > 1e-5


def test_alpha_micro_conditioning_is_each_samples_training_size(tmp_path):
    """A PixArt-α pipeline whose transformer has use_additional_conditions: resolution (h, w) and aspect ratio h / w
    from the batch's target sizes, as the α pipeline passes its output size; 120 T5 tokens."""
    sigma = PixArtSigmaPipeline.from_pretrained(build_tiny_pixart_pipeline(tmp_path / "s", use_additional_conditions=True))
    PixArtAlphaPipeline(**sigma.components).save_pretrained(tmp_path / "alpha", safe_serialization=True)
    alpha = load_family(ModelConfig(pretrained_model_name_or_path=str(tmp_path / "alpha")))
    assert isinstance(alpha, PixArtAdapter) and isinstance(alpha.pipeline, PixArtAlphaPipeline)
    assert alpha.max_sequence_length == 120 and alpha.card_tags()[0] == "pixart-alpha"
    batch = {**_batch(2), "target_sizes": torch.tensor([[32, 32], [16, 48]])}
    cond = alpha.conditioning(batch, CPU, torch.bfloat16, drop=False)
    assert cond["encoder_hidden_states"].shape == (2, 120, 32)
    assert cond["resolution"].dtype == torch.float32 and cond["resolution"].tolist() == [[32, 32], [16, 48]]
    torch.testing.assert_close(cond["aspect_ratio"], torch.tensor([[1.0], [1 / 3]]))
    noisy = torch.randn(1, 4, 4, 4).expand(2, -1, -1, -1)  # same latents and text, different sizes
    pred = alpha.predict(alpha.denoiser, noisy, torch.tensor([500, 500]), cond).model_pred
    assert (pred[0] - pred[1]).abs().max() > 1e-5
    assert isinstance(alpha.export_pipeline(alpha.denoiser), PixArtAlphaPipeline)


def test_cached_validation_grid_is_the_pipelines_own(tiny_pixart, tmp_path):
    """With the encoder released, a grid from cached embeddings and masks (the empty prompt's as the negative) is
    the grid the pipeline samples from the prompt with its own negative prompt ""."""
    prompts = ["a red square"]
    with_encoder, cached = (load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_pixart))) for _ in range(2))
    data = type("Data", (), {"text_cache_dir": str(tmp_path / "text")})()
    build_text_cache(Accelerator(cpu=True), cached, ["", *prompts], data, torch.float32, batch_size=2)
    assert cached.pipeline.text_encoder is None

    def grid(a):
        a.set_resolution(32)
        pipeline = a.export_pipeline(a.denoiser)
        pipeline.set_progress_bar_config(disable=True)
        return torch.from_numpy(a.sample_grid(pipeline, 1, 2, 4.5, 0, prompts))

    expected = grid(with_encoder)
    assert expected.shape == (1, 1, 32, 32, 3)
    torch.testing.assert_close(grid(cached), expected, rtol=0, atol=1e-4)


def test_class_and_kohya_options_are_refused_in_one_line(tiny_pixart, tmp_path, capsys):
    args = ["--pretrained", str(tiny_pixart), "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    for flags, field in ((["--disc_class_conditional"], "disc_class_conditional"),
                         (["--sddit_weight", "0.1"], "sddit_weight"),
                         (["--trainable", "lora", "--lora_export_format", "kohya"], "lora_export_format"),
                         (["--validation_class_labels", "1"], "validation_class_labels")):
        assert main(args + flags) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"sadm-train: error: {field}: ") and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_full_fine_tune_with_sadm_on_buckets_exports_a_stock_pipeline(tiny_pixart, tmp_path, stock_diffusers):
    data, _ = build_mixed_aspect_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny_run_args(tiny_pixart, data, out, steps=3) + [
        "--resolution", "32", "--train_batch_size", "2", "--aspect_ratio_buckets", "--random_flip",
        "--gradient_checkpointing", "--validation_steps", "2", "--validation_prompts", "img-0", "an unseen prompt",
        "--report_to", "none"]
    proc = accelerate_launch(args, offline_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SADM: lambda 0.01" in proc.stdout and "aspect-ratio buckets" in proc.stdout
    name = "transformer/diffusion_pytorch_model.safetensors"
    trained, original = (load_file(str(p / name)) for p in (out, tiny_pixart))
    assert trained.keys() == original.keys()
    assert max((trained[k] - original[k]).abs().max().item() for k in trained) > 1e-4  # trained, beyond rounding
    for frozen in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(out / frozen)), load_file(str(tiny_pixart / frozen))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {"step-2.png", "final.png"} <= {p.name for p in (out / "samples").iterdir()}
    with Image.open(out / "samples" / "final.png") as grid:  # 2 prompts x 1 image at the trained 32 px, no binning
        assert grid.size == (32, 64)
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert {"pixart-sigma", "text-to-image", "sadm"} <= set(card["tags"])

    seen = stock_diffusers.load(out, prompts=["a red square"])  # the pipeline's defaults: 256 px (binning)
    assert seen == {"cls": "PixArtSigmaPipeline", "labels": None, "shape": [1, 256, 256, 3], "finite": True,
                    "sadm_finetune_imported": False}, seen.get("error")


@pytest.mark.slow
def test_lora_with_ema_and_caches_merged_export_equals_base_plus_adapter(tiny_pixart, tmp_path, stock_diffusers):
    data = build_captioned_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny_run_args(tiny_pixart, data, out, steps=3) + [
        "--resolution", "32", "--trainable", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
        "--use_ema", "--ema_decay", "0.9", "--cache_latents", "--center_crop", "--cache_text_embeddings",
        "--latent_cache_dir", str(tmp_path / "latents"), "--text_cache_dir", str(tmp_path / "text"),
        "--validation_prompts", "a red square", "--validation_steps", "2", "--structure_weight", "0", "--report_to",
        "none"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SADM: off" in proc.stdout  # SADM on: the accelerate-launch run above
    assert "latent cache: encoding" in proc.stdout and "text cache: 0 of 5 prompts cached" in proc.stdout
    assert (out / "samples" / "step-2.png").is_file()  # sampled from the cached embeddings, the encoder released
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.transformer_blocks.") and ".lora_" in k for k in keys)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys} >= {"to_q", "to_k", "to_v", "0", "proj", "2"}
    card = (out / "README.md").read_text()
    assert "PixArtTransformer2DModelWithLoRA" in card and "load_lora_adapter" in card
    assert "lora" in yaml.safe_load(card.split("---")[1])["tags"]

    # The merged transformer and the base with the adapter file applied compute the same prediction.
    merged = PixArtTransformer2DModel.from_pretrained(out, subfolder="transformer").eval()
    with_lora = PixArtTransformer2DModelWithLoRA.from_pretrained(tiny_pixart, subfolder="transformer")
    with_lora.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="transformer",
                                use_safetensors=True)
    plain = PixArtTransformer2DModel.from_pretrained(tiny_pixart, subfolder="transformer").eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 4, 4, 4, generator=g), timestep=torch.tensor([10, 600]),
                  encoder_hidden_states=torch.randn(2, 300, 32, generator=g), encoder_attention_mask=torch.ones(2, 300),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        expected = merged(**inputs).sample
        torch.testing.assert_close(with_lora.eval()(**inputs).sample, expected, rtol=1e-4, atol=1e-5)
        assert (expected - plain(**inputs).sample).abs().max() > 1e-3  # the LoRA did change the model

    seen = stock_diffusers.load(out, prompts=["a red square"])
    assert seen.get("error") is None, seen["error"]
    assert seen["cls"] == "PixArtSigmaPipeline" and seen["finite"] and not seen["sadm_finetune_imported"]
