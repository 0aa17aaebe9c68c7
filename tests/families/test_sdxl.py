"""Stable Diffusion XL family: two text encoders, pooled embeddings, micro-conditioning from the batch's geometry,
cached validation negatives, and full and LoRA fine-tunes with SADM end to end (stock diffusers reloads them)."""

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from launch import accelerate_launch, offline_env, tiny_run_args, train_in_process
from sadm_finetune.cli import main
from sadm_finetune.config.run import DataConfig, ModelConfig
from sadm_finetune.data.datasets import open_train_data
from sadm_finetune.utils.errors import InputError
from sadm_finetune.data.latent_cache import cache_key
from sadm_finetune.diffusion.latents import encode
from sadm_finetune.tuners.kohya import KOHYA_WEIGHT_NAME
from sadm_finetune.families.loading import load_family
from sadm_finetune.families.sd import StableDiffusionAdapter
from sadm_finetune.families.sdxl import StableDiffusionXLAdapter
from sadm_finetune.families.vae import vae_dtype
from sadm_finetune.data.text_cache import build_text_cache, text_fingerprint
from sadm_finetune.train.entry import place_frozen_modules
from sadm_finetune.train.validation import vae_outside_autocast
from tiny_sd import CAPTIONS, build_captioned_folder, build_mixed_aspect_folder
from tiny_sdxl import build_tiny_sdxl_pipeline, build_tiny_vae

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "base")


@pytest.fixture(scope="module")
def adapter(tiny_sdxl):
    return load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl), caption_dropout_prob=0.5))


def _batch(crop_top_lefts):
    n = len(crop_top_lefts)
    return {"captions": [CAPTIONS[0]] * n, "pixel_values": torch.zeros(n, 3, 32, 32),
            "original_sizes": torch.tensor([[40, 56]] * n), "crop_top_lefts": torch.tensor(crop_top_lefts),
            "target_sizes": torch.tensor([[32, 32]] * n), "flips": torch.zeros(n, dtype=torch.bool)}


def test_loads_as_the_sdxl_family(adapter):
    assert isinstance(adapter, StableDiffusionXLAdapter) and adapter.denoiser is adapter.pipeline.unet
    assert adapter.frozen_modules() == [adapter.vae, adapter.pipeline.text_encoder, adapter.pipeline.text_encoder_2]
    assert adapter.default_resolution() == 32 and "stable-diffusion-xl" in adapter.card_tags()


def test_add_time_ids_are_each_samples_geometry(adapter):
    batch = _batch([[0, 0], [4, 12]])  # one caption, two crops of the same image
    cond = adapter.conditioning(batch, CPU, torch.float32, drop=False)
    for i in range(2):  # the pipeline's own (original_size, crops_coords_top_left, target_size) order
        expected = adapter.pipeline._get_add_time_ids(
            tuple(batch["original_sizes"][i].tolist()), tuple(batch["crop_top_lefts"][i].tolist()),
            tuple(batch["target_sizes"][i].tolist()), torch.float32, text_encoder_projection_dim=32)
        torch.testing.assert_close(cond["time_ids"][i:i + 1], expected, rtol=0, atol=0)
    assert not torch.equal(cond["time_ids"][0], cond["time_ids"][1])
    odd = {**batch, "original_sizes": torch.tensor([[1365, 2047]] * 2)}  # not representable in bf16
    assert adapter.conditioning(odd, CPU, torch.bfloat16, drop=False)["time_ids"][0, :2].tolist() == [1365, 2047]
    # ... and the UNet reads them: same latents, timestep and text, different crops -> different predictions.
    noisy = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1)
    pred = adapter.predict(adapter.denoiser, noisy, torch.tensor([500, 500]), cond).model_pred
    assert (pred[0] - pred[1]).abs().max() > 1e-4


def test_encode_text_is_the_pipelines_encode_prompt(adapter):
    prompts = list(CAPTIONS[:3])
    encoded = adapter.encode_text(prompts, CPU)
    prompt_embeds, _, pooled, _ = adapter.pipeline.encode_prompt(prompts, device="cpu",
                                                                 do_classifier_free_guidance=False)
    assert prompt_embeds.shape == (3, 16, 64) and pooled.shape == (3, 32)
    torch.testing.assert_close(encoded["prompt_embeds"], prompt_embeds)
    torch.testing.assert_close(encoded["pooled_prompt_embeds"], pooled)
    cond = adapter.conditioning({**_batch([[0, 0]] * 3), "captions": prompts}, CPU, torch.float32, drop=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], prompt_embeds)
    torch.testing.assert_close(cond["text_embeds"], pooled)


def test_caption_dropout_drops_both_embeddings_together(adapter):
    cond = adapter.conditioning(_batch([[0, 0]] * 64), CPU, torch.float32, drop=True,
                                generator=torch.Generator().manual_seed(0))
    empty = adapter.encode_text([""], CPU)

    def is_empty(value, name):
        return [torch.allclose(v, empty[name][0], atol=1e-5) for v in value]

    dropped = is_empty(cond["encoder_hidden_states"], "prompt_embeds")
    assert dropped == is_empty(cond["text_embeds"], "pooled_prompt_embeds")
    assert 10 < sum(dropped) < 54  # p = 0.5


@pytest.mark.parametrize("force_zeros", [True, False])
def test_cached_validation_grids_match_the_pipelines_own_negatives(tiny_sdxl, tmp_path, force_zeros):
    """With the encoders released, a grid from cached embeddings is the grid the pipeline samples from prompts:
    zeros as negatives under `force_zeros_for_empty_prompt`, the empty prompt's embeddings without it."""
    prompts = ["a red square"]
    with_encoders, cached = (load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl)))
                             for _ in range(2))
    for a in (with_encoders, cached):
        a.pipeline.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    data = type("Data", (), {"text_cache_dir": str(tmp_path / "text")})()
    build_text_cache(Accelerator(cpu=True), cached, ["", *prompts], data, torch.float32, batch_size=2)
    assert cached.pipeline.text_encoder is None and cached.pipeline.text_encoder_2 is None

    def grid(a):
        pipeline = a.export_pipeline(a.denoiser)
        pipeline.set_progress_bar_config(disable=True)
        return torch.from_numpy(a.sample_grid(pipeline, 1, 2, 3.0, 0, prompts))

    torch.testing.assert_close(grid(cached), grid(with_encoders), rtol=0, atol=1e-4)


def test_dit_only_options_are_refused_in_one_line(tiny_sdxl, tmp_path, capsys):
    args = ["--pretrained", str(tiny_sdxl), "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    for flags, field in ((["--disc_class_conditional"], "disc_class_conditional"),
                         (["--sddit_weight", "0.1"], "sddit_weight")):
        assert main(args + flags) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"sadm-train: error: {field}: ") and f"drop --{field}" in err, err
        assert len(err.splitlines()) == 1


# -- the VAE: a separate one, and its dtype under mixed precision ----------------------------------------------
@pytest.fixture(scope="module")
def second_vae(tmp_path_factory):
    return build_tiny_vae(tmp_path_factory.mktemp("vae") / "vae-fix", seed=1)


def _same_weights(module, folder):
    expected, state = load_file(str(folder / "diffusion_pytorch_model.safetensors")), module.state_dict()
    return expected.keys() == state.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def test_a_separate_vae_encodes_is_exported_and_keys_the_latent_cache(tiny_sdxl, second_vae, tmp_path):
    adapter = load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl)))  # fresh (the fixture's is cached)
    other = load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl),
                                    pretrained_vae_model_name_or_path=str(second_vae)))
    assert _same_weights(other.vae, second_vae) and other.pipeline.vae is other.vae
    assert not _same_weights(adapter.vae, second_vae)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = [encode(a.vae, pixels, torch.Generator().manual_seed(0)) for a in (adapter, other)]
    assert (latents[0] - latents[1]).abs().max() > 1e-2  # the training latents come from the separate VAE
    data = open_train_data(DataConfig(train_data_dir=str(build_captioned_folder(tmp_path / "data"))))
    keys = [cache_key(a.vae, data, 32, False) for a in (adapter, other)]
    assert keys[0]["vae"] != keys[1]["vae"] and {**keys[0], "vae": None} == {**keys[1], "vae": None}
    # The text caches are keyed on the text encoders, which a separate VAE does not change.
    assert text_fingerprint(adapter, torch.float32) == text_fingerprint(other, torch.float32)
    # The export (and its fp32 reload after mixed precision) carries the separate VAE, not the base's vae/.
    assert _same_weights(other.load_component("vae"), second_vae)
    assert other.export_pipeline(other.denoiser).vae is other.vae
    # A pipeline folder works too (its vae/).
    again = load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl),
                                    pretrained_vae_model_name_or_path=str(tiny_sdxl)))
    assert _same_weights(again.vae, tiny_sdxl / "vae")
    # the card's LoRA usage code loads the same separate VAE (valid Python, the VAE passed to the pipeline)
    usage = other.lora_usage("org/base", "org/lora", "pytorch_lora_weights.safetensors", "image = pipe('a').images[0]")
    compile(usage, "card", "exec")
    assert f'vae = AutoencoderKL.from_pretrained("{second_vae}", dtype=dtype)' in usage and ", vae=vae, " in usage
    assert "vae" not in adapter.lora_usage("org/base", "org/lora", "x.safetensors", "image = pipe('a').images[0]")


def test_an_unusable_separate_vae_is_one_line(tiny_sdxl, tmp_path):
    wrong = build_tiny_vae(tmp_path / "vae-8ch", latent_channels=8)
    for source, why in ((wrong, "has 8 latent channels and the pipeline's own VAE 4"),
                        (tmp_path / "missing", "folder .* not found"), (tmp_path, "has no config.json")):
        with pytest.raises(InputError, match=f"^pretrained_vae_model_name_or_path: .*{why}") as e:
            load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl),
                                    pretrained_vae_model_name_or_path=str(source)))
        assert "\n" not in str(e.value)


def test_the_vae_stays_fp32_under_fp16(tiny_sdxl):
    fresh = load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl)))
    place_frozen_modules(fresh, CPU, torch.float16)  # what train() does with an fp16 weight_dtype
    assert fresh.vae.dtype == torch.float32 and not any(p.requires_grad for p in fresh.vae.parameters())
    assert fresh.pipeline.text_encoder.dtype == fresh.pipeline.text_encoder_2.dtype == torch.float16
    # bf16: SDXL's script keeps its VAE fp32 under any mixed precision; SD 1.x/2.x's casts it to weight_dtype.
    assert fresh.frozen_dtype(fresh.vae, torch.bfloat16) == torch.float32
    assert fresh.frozen_dtype(fresh.pipeline.text_encoder, torch.bfloat16) == torch.bfloat16
    assert not StableDiffusionAdapter.vae_fp32_under_bf16 and vae_dtype(torch.bfloat16) == torch.bfloat16
    assert vae_dtype(torch.float16) == vae_dtype(torch.float32) == torch.float32


def test_validation_decodes_outside_autocast(adapter):
    vae, z = adapter.vae, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = vae.decode(z).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = vae.decode(z).sample
            with vae_outside_autocast(vae):
                kept = vae.decode(z.bfloat16()).sample
    assert rounded.dtype == torch.bfloat16 and (rounded.float() - reference).abs().max() > 1e-3
    assert kept.dtype == torch.float32
    torch.testing.assert_close(kept, vae.decode(z.bfloat16().float()).sample, rtol=0, atol=0)
    assert "decode" not in vae.__dict__  # the class's own decode is back


def _changed(out, base, name="unet/diffusion_pytorch_model.safetensors"):
    trained, original = load_file(str(out / name)), load_file(str(base / name))
    assert trained.keys() == original.keys()
    return max((trained[k] - original[k]).abs().max().item() for k in trained)


@pytest.mark.slow
def test_full_fine_tune_on_buckets_with_caches_exports_a_stock_pipeline(tmp_path, stock_diffusers):
    base = build_tiny_sdxl_pipeline(tmp_path / "base", prediction_type="v_prediction")
    data, _ = build_mixed_aspect_folder(tmp_path / "data")
    out, text_cache = tmp_path / "out", tmp_path / "text-cache"
    vae = build_tiny_vae(tmp_path / "vae-fix")  # a separate VAE: encodes the cache, is exported
    args = tiny_run_args(base, data, out, steps=2) + [
        "--train_batch_size", "2", "--aspect_ratio_buckets", "--cache_latents", "--center_crop", "--random_flip",
        "--latent_cache_dir", str(tmp_path / "latents"), "--cache_text_embeddings", "--text_cache_dir", str(text_cache),
        "--gradient_checkpointing", "--validation_steps", "2", "--validation_prompts", "img-0", "an unseen prompt",
        "--pretrained_vae_model_name_or_path", str(vae)]
    proc = accelerate_launch(args, offline_env(tmp_path))  # the way users run it: one CLI run per family
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SADM: lambda 0.01" in proc.stdout and "aspect-ratio buckets" in proc.stdout
    assert "family defaults (docs/defaults.md; set them to override): adam_weight_decay 0.01" in proc.stdout
    assert _same_weights(StableDiffusionXLPipeline.from_pretrained(out).vae, vae)
    assert _changed(out, base) > 1e-4  # trained, beyond rounding
    for encoder in ("text_encoder", "text_encoder_2"):  # released for the cache, back in the export bit for bit
        a, b = (load_file(str(p / encoder / "model.safetensors")) for p in (out, base))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {"step-2.png", "final.png"} <= {p.name for p in (out / "samples").iterdir()}  # from cached embeddings
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert "stable-diffusion-xl" in card["tags"]

    seen = stock_diffusers.load(out, prompts=["a red square"])
    assert seen == {"cls": "StableDiffusionXLPipeline", "labels": None, "shape": [1, 32, 32, 3], "finite": True,
                    "sadm_finetune_imported": False}, seen.get("error")
    assert StableDiffusionXLPipeline.from_pretrained(out).scheduler.config.prediction_type == "v_prediction"


@pytest.mark.slow
def test_lora_with_export_merged_writes_both_files_and_the_merged_pipeline(tiny_sdxl, tmp_path, stock_diffusers):
    data = build_captioned_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny_run_args(tiny_sdxl, data, out, steps=2) + [
        "--trainable", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
        "--random_flip", "--use_ema", "--ema_decay", "0.9", "--export_merged", "--report_to", "none"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SADM: lambda 0.01" in proc.stdout
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)
    with safe_open(str(out / KOHYA_WEIGHT_NAME), "pt") as f:  # by default too, labelled SDXL for A1111 / Forge
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert _changed(out, tiny_sdxl) > 1e-4  # the merged export carries the trained LoRA
    card = (out / "README.md").read_text()
    assert {"stable-diffusion-xl", "stable-diffusion-xl-diffusers", "lora"} <= set(
        yaml.safe_load(card.split("---")[1])["tags"])
    assert "pipe = StableDiffusionXLPipeline.from_pretrained(" in card and "pipe.load_lora_weights(" in card
    assert "DiffusionPipeline.from_pretrained(\"out\"" in card and KOHYA_WEIGHT_NAME in card

    # The merged export and the base with the LoRA file applied by stock diffusers sample the same images.
    fused = StableDiffusionXLPipeline.from_pretrained(out)
    with_lora = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    with_lora.load_lora_weights(out)
    for pipe in (fused, with_lora):
        pipe.set_progress_bar_config(disable=True)
    images = [pipe(["a red square"], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
              for pipe in (fused, with_lora)]
    np.testing.assert_allclose(images[0], images[1], atol=1e-4)

    seen = stock_diffusers.load(tiny_sdxl, prompts=["a red square"], lora=out)
    assert seen.get("error") is None, seen["error"]
    assert seen["cls"] == "StableDiffusionXLPipeline" and not seen["sadm_finetune_imported"]
    assert seen["lora_change"] > 1e-3
    # diffusers' own kohya loader reproduces the diffusers-format file's images
    seen = stock_diffusers.load(tiny_sdxl, prompts=["a red square"], lora=out,
                                lora_weight_names=["pytorch_lora_weights.safetensors", KOHYA_WEIGHT_NAME])
    assert seen.get("error") is None, seen["error"]
    np.testing.assert_allclose(np.asarray(seen["lora_images"][KOHYA_WEIGHT_NAME]),
                               np.asarray(seen["lora_images"]["pytorch_lora_weights.safetensors"]), atol=1e-5)
