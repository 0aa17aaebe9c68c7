"""Latent cache: hits, misses, invalidation, and exactly the draws the pixel path makes."""

import os

import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from PIL import Image

from sadm_finetune.data import latent_cache
from sadm_finetune.data.buckets import aspect_ratio_buckets
from sadm_finetune.config.run import DataConfig, build_config
from sadm_finetune.data.datasets import ImageTransform, TrainDataset, collate, open_train_data
from sadm_finetune.utils.errors import ConfigError
from sadm_finetune.data.latent_cache import CachedLatentDataset, build_latent_cache
from sadm_finetune.diffusion.latents import encode, sample_latents
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    path = build_tiny_dit_pipeline(tmp_path_factory.mktemp("dit"), num_classes=2)
    return AutoencoderKL.from_pretrained(path, subfolder="vae").eval()


@pytest.fixture
def folder(tmp_path):
    return build_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=3, size=40)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _cfg(folder, cache_dir, **kw):
    return DataConfig(train_data_dir=str(folder), center_crop=True, cache_latents=True,
                      latent_cache_dir=str(cache_dir), **kw)


def _build(accelerator, vae, cfg, resolution=32, buckets=None):
    return build_latent_cache(accelerator, vae, open_train_data(cfg), cfg, resolution, batch_size=4, buckets=buckets)


@pytest.fixture
def count_encodes(monkeypatch):
    calls = []
    real = latent_cache._encode_shard
    monkeypatch.setattr(latent_cache, "_encode_shard", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def test_hit_reuses_the_folder_without_encoding(tmp_path, folder, vae, accelerator, count_encodes):
    cfg = _cfg(folder, tmp_path / "cache")
    first = _build(accelerator, vae, cfg)
    assert count_encodes == [1] and (first / "manifest.json").is_file()
    mtime = (first / "shard-00000.safetensors").stat().st_mtime_ns
    assert _build(accelerator, vae, cfg) == first
    assert count_encodes == [1] and (first / "shard-00000.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("change", ["resolution", "random_flip", "data", "vae", "max_train_samples", "buckets",
                                    "bucket_multiple"])
def test_any_key_change_re_encodes(tmp_path, folder, vae, accelerator, count_encodes, change):
    cfg = _cfg(folder, tmp_path / "cache")
    buckets = aspect_ratio_buckets(32, 8) if change == "bucket_multiple" else None
    first = _build(accelerator, vae, cfg, buckets=buckets)
    resolution = 32
    if change == "buckets":
        buckets = aspect_ratio_buckets(32, 8)
    elif change == "bucket_multiple":
        buckets = aspect_ratio_buckets(32, 16)
    elif change == "resolution":
        resolution = 16
    elif change == "random_flip":
        cfg = _cfg(folder, tmp_path / "cache", random_flip=True)
    elif change == "max_train_samples":
        cfg = _cfg(folder, tmp_path / "cache", max_train_samples=4)
    elif change == "data":  # same file names, new content
        image = folder / "cat" / "0.png"
        Image.new("RGB", (40, 40), (200, 10, 10)).save(image)
        os.utime(image, ns=(1, 1))
    elif change == "vae":
        vae = AutoencoderKL.from_config(vae.config)
        vae.load_state_dict({k: v.clone() for k, v in vae.state_dict().items()})
        with torch.no_grad():
            next(vae.parameters()).add_(1e-3)
    second = _build(accelerator, vae, cfg, resolution, buckets)
    assert second != first and count_encodes == [1, 1]


def test_cached_draw_equals_the_pixel_path(tmp_path, folder, vae, accelerator):
    cfg = _cfg(folder, tmp_path / "cache", random_flip=True)
    data = open_train_data(cfg)
    cached = CachedLatentDataset(data, _build(accelerator, vae, cfg), random_flip=True, seed=3)
    pixels = TrainDataset(data, ImageTransform(32, center_crop=True, random_flip=True), seed=3)
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        pixels.set_epoch(epoch)
        a, b = collate([cached[i] for i in range(6)]), collate([pixels[i] for i in range(6)])
        assert torch.equal(a["class_labels"], b["class_labels"])
        from_cache = sample_latents(vae, a["latent_mean"], a["latent_std"], torch.Generator().manual_seed(epoch))
        from_pixels = encode(vae, b["pixel_values"], torch.Generator().manual_seed(epoch))
        # The same orientation is picked, and the same posterior sample drawn.
        torch.testing.assert_close(from_cache, from_pixels, rtol=1e-5, atol=1e-5)


def test_flips_vary_by_epoch_and_are_replayable(tmp_path, folder, vae, accelerator):
    cfg = _cfg(folder, tmp_path / "cache", random_flip=True)
    data = open_train_data(cfg)
    ds = CachedLatentDataset(data, _build(accelerator, vae, cfg), random_flip=True, seed=0)

    def means(epoch):
        ds.set_epoch(epoch)
        return torch.stack([ds[i]["latent_mean"] for i in range(len(ds))])

    assert torch.equal(means(0), means(0))
    assert not all(torch.equal(means(0), means(e)) for e in range(1, 4))


def test_unreadable_image_is_skipped_like_the_pixel_path(tmp_path, folder, vae, accelerator):
    (folder / "cat" / "1.png").write_bytes(b"not a png")
    cfg = _cfg(folder, tmp_path / "cache", on_bad_image="skip")
    data = open_train_data(cfg)
    ds = CachedLatentDataset(data, _build(accelerator, vae, cfg), random_flip=False)
    assert ds.valid.tolist().count(False) == 1
    bad = ds.valid.tolist().index(False)
    assert torch.equal(ds[bad]["latent_mean"], ds[bad + 1]["latent_mean"])


def test_cache_needs_center_crop():
    with pytest.raises(ConfigError, match="cache_latents.*center_crop"):
        build_config({"pretrained_model_name_or_path": "x", "train_data_dir": "d", "cache_latents": True})


def test_building_the_cache_leaves_the_global_random_generator_alone(tmp_path, folder, vae, accelerator):
    """A run that builds the cache must train as one that finds it: encoding draws nothing from torch's global
    generator (a DataLoader's iterator takes its base seed from it unless given its own)."""
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    _build(accelerator, vae, _cfg(folder, tmp_path / "cache"))
    assert torch.equal(torch.random.get_rng_state(), before)
