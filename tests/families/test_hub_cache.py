"""`--pretrained <Hub id>` offline through the real Hub code path: tiny pipelines placed in a Hugging Face
cache layout (models--org--name/{refs, snapshots/<commit>}) under real ids; --revision and --variant pick
the weights; a model missing from the cache, or gated, is one line saying what to do."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

from sadm_finetune.cli import main
from hub_cache import cache_model, hub_cache  # noqa: F401, F811 (fixture)


DIT_ID = "facebook/DiT-XL-2-256"
SD_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MAIN, V2 = "a" * 40, "b" * 40  # commits


def weights(folder: Path, component: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    name = "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
    return {k: v.float() for k, v in load_file(str(folder / component / name)).items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    # One step at a negligible learning rate: the exported denoiser stays within ~1e-6 of what was loaded.
    return ["--train_data_dir", str(data), "--output_dir", str(out), "--max_train_steps", "1",
            "--train_batch_size", "2", "--learning_rate", "1e-7", "--report_to", "none", "--disc_width", "8",
            "--disc_depth", "2", "--disc_embed_dim", "16", "--num_validation_images", "1",
            "--validation_inference_steps", "1", *extra]


def test_dit_hub_id_offline_honours_revision_and_variant(hub_cache, tmp_path, capsys):
    versions = {name: build_tiny_dit_pipeline(tmp_path / name, num_classes=2, seed=seed)
                for name, seed in (("main", 0), ("v2", 1), ("fp16", 2))}
    snapshot = cache_model(hub_cache, DIT_ID, versions["main"], MAIN, ["main"])
    cache_model(hub_cache, DIT_ID, versions["v2"], V2, ["v2"])
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    for component, cls in (("transformer", DiTTransformer2DModel), ("vae", AutoencoderKL)):  # fp16 files, other weights
        cls.from_pretrained(versions["fp16"] / component).to(torch.float16).save_pretrained(
            snapshot / component, variant="fp16", safe_serialization=True)
    expected = {"main": {c: weights(versions["main"], c) for c in ("transformer", "vae")},
                "v2": {c: weights(versions["v2"], c) for c in ("transformer", "vae")},
                "fp16": {c: weights(snapshot, c, "fp16") for c in ("transformer", "vae")}}
    assert max_diff(expected["main"]["vae"], expected["fp16"]["vae"]) > 0.01  # the versions do differ
    data = build_image_folder(tmp_path / "data", per_class=2)

    for name, extra in (("main", []), ("v2", ["--revision", "v2"]), ("v2", ["--revision", V2]),
                        ("fp16", ["--variant", "fp16"])):
        out = tmp_path / f"out-{name}-{len(extra[1]) if extra else 0}"
        assert main(["--pretrained", DIT_ID, *run_args(data, out, *extra)]) == 0, capsys.readouterr().err[-3000:]
        vae, transformer = weights(out, "vae"), weights(out, "transformer")
        stored = {load_file(str(out / c / "diffusion_pytorch_model.safetensors"))["proj_out_2.bias" if c ==
                  "transformer" else "encoder.conv_in.weight"].dtype for c in ("transformer", "vae")}
        assert stored == {torch.float16 if name == "fp16" else torch.float32}, (name, stored)  # the base's own dtype
        for other, components in expected.items():
            if other == name:
                assert max_diff(vae, components["vae"]) == 0, (name, extra)  # the frozen VAE, bit for bit
                assert max_diff(transformer, components["transformer"]) < 1e-4, (name, extra)
            else:
                assert max_diff(vae, components["vae"]) > 0.01, (name, other, extra)
                assert max_diff(transformer, components["transformer"]) > 0.01, (name, other, extra)


def test_stable_diffusion_hub_id_offline_by_commit(hub_cache, tmp_path, capsys):
    from tiny_sd import build_captioned_folder, build_tiny_sd_pipeline

    first = build_tiny_sd_pipeline(tmp_path / "sd-main", seed=0)
    second = build_tiny_sd_pipeline(tmp_path / "sd-v2", seed=1)
    cache_model(hub_cache, SD_ID, first, MAIN, ["main"])
    cache_model(hub_cache, SD_ID, second, V2, [])  # reachable only by its commit hash
    data = build_captioned_folder(tmp_path / "captions", num_images=4)
    out = tmp_path / "out-sd"
    assert main(["--pretrained", SD_ID, *run_args(data, out, "--revision", V2)]) == 0, capsys.readouterr().err[-3000:]
    assert max_diff(weights(out, "vae"), weights(second, "vae")) == 0
    assert max_diff(weights(out, "vae"), weights(first, "vae")) > 0.01
    assert max_diff(weights(out, "unet"), weights(second, "unet")) < 1e-4


def test_hub_id_missing_from_the_cache_offline_is_one_line(hub_cache, tmp_path, capsys):
    data = build_image_folder(tmp_path / "data", per_class=2)
    assert main(["--pretrained", DIT_ID, *run_args(data, tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"{DIT_ID} is not in the local Hugging Face cache" in err and "HF_HUB_OFFLINE" in err
    assert f"hf download {DIT_ID}" in err
    assert "model_index.json" not in err and "login" not in err
    assert not (tmp_path / "out").exists()


def test_gated_model_without_access_is_one_line(fake_hub, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_TOKEN")  # no token: the Hub answers 401 GatedRepo
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    fake_hub.gated.add(DIT_ID)
    data = build_image_folder(tmp_path / "data", per_class=2)
    assert main(["--pretrained", DIT_ID, *run_args(data, tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"{DIT_ID} is a gated model" in err and "HF_TOKEN" in err and "accept its terms" in err
    assert any(r.path.endswith("/model_index.json") for r in fake_hub.requests)  # it did ask the (fake) Hub
