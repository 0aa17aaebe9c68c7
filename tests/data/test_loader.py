"""The training data loader: per-sample conditioning metadata, bucketed batches, resume, the latent cache."""

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from launch import tiny_run_args, train_in_process
from sadm_finetune.cli import main
from sadm_finetune.config.run import ModelConfig, build_config
from sadm_finetune.data.datasets import GEOMETRY_KEYS, open_train_data
from sadm_finetune.diffusion.latents import encode, sample_latents
from sadm_finetune.data.loader import build_train_dataloader
from sadm_finetune.families.loading import load_family
from sadm_finetune.train.entry import make_accelerator
from tiny_pipelines import build_tiny_dit_pipeline
from tiny_sd import build_mixed_aspect_folder, build_tiny_sd_pipeline

# The tiny SD (VAE factor 4, UNet factor 2) buckets at 32 px are 32x32, 40x24, 24x40, 48x24, 24x48; the mixed
# folder's 12 images fill three of them, 4 images each: 6 batches of 2 per epoch.
BATCHES_PER_EPOCH = 6


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "base")


@pytest.fixture(scope="module")
def adapter(tiny_sd):
    return load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_sd)))


@pytest.fixture
def mixed(tmp_path):
    return build_mixed_aspect_folder(tmp_path / "data")


def _config(tiny_sd, data_dir, tmp_path, **fields):
    return build_config({"pretrained_model_name_or_path": str(tiny_sd), "train_data_dir": str(data_dir),
                         "train_batch_size": 2, "report_to": "none", "latent_cache_dir": str(tmp_path / "latents"),
                         **fields})


def _prepared(config, adapter, tmp_path):
    """What `training.train` builds: the run's accelerator, the seed set, the dataset and the prepared loader."""
    accelerator = make_accelerator(config, tmp_path / "out")
    set_seed(config.training.seed)
    data = open_train_data(config.data)
    dataset, loader = build_train_dataloader(config, accelerator, adapter, data, 32)
    return accelerator, dataset, accelerator.prepare(loader)


def _epoch(accelerator, dataset, loader, epoch, skip=0):
    """One epoch as `training._loop` draws it, resuming after `skip` batches."""
    loader.set_epoch(epoch)
    dataset.set_epoch(epoch)
    return list(accelerator.skip_first_batches(loader, skip) if skip else loader)


def _expected_crop(original, target, flipped):
    """Center crop of an image resized to cover the target, counted after a flip."""
    (h, w), (th, tw) = original, target
    scale = max(th / h, tw / w)
    rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
    y, x = (rh - th) // 2, (rw - tw) // 2
    return [y, rw - x - tw if flipped else x]


@pytest.mark.parametrize("cache_latents", [False, True], ids=["pixels", "cached-latents"])
def test_each_sample_carries_its_geometry_to_the_adapter(tmp_path, tiny_sd, adapter, mixed, cache_latents):
    root, sizes = mixed
    config = _config(tiny_sd, root, tmp_path, aspect_ratio_buckets=True, center_crop=True, random_flip=True,
                     cache_latents=cache_latents)
    accelerator, dataset, loader = _prepared(config, adapter, tmp_path)
    key, factor = ("latent_mean", adapter.vae_scale_factor) if cache_latents else ("pixel_values", 1)
    flips, shapes = set(), set()
    for batch in _epoch(accelerator, dataset, loader, 0):
        target = [side * factor for side in batch[key].shape[-2:]]
        shapes.add(tuple(target))
        for i, caption in enumerate(batch["captions"]):  # each caption names its image
            flipped = bool(batch["flips"][i])
            assert batch["original_sizes"][i].tolist() == list(sizes[caption])
            assert batch["target_sizes"][i].tolist() == target
            assert batch["crop_top_lefts"][i].tolist() == _expected_crop(sizes[caption], target, flipped)
            flips.add(flipped)
        # The SD adapter takes the batch as it comes (it has no micro-conditioning, so it reads no geometry).
        cond = adapter.conditioning(batch, accelerator.device, torch.float32, drop=False)
        assert cond["encoder_hidden_states"].shape[0] == len(batch["captions"])
    assert shapes == {(32, 32), (48, 24), (24, 48)} and flips == {False, True}


@pytest.mark.parametrize("cache_latents", [False, True], ids=["pixels", "cached-latents"])
def test_a_resumed_run_draws_the_same_bucketed_batches(tmp_path, tiny_sd, adapter, mixed, cache_latents):
    config = _config(tiny_sd, mixed[0], tmp_path, aspect_ratio_buckets=True, random_flip=True, seed=3,
                     center_crop=cache_latents, cache_latents=cache_latents)
    key = "latent_mean" if cache_latents else "pixel_values"
    accelerator, dataset, loader = _prepared(config, adapter, tmp_path)
    epochs = [_epoch(accelerator, dataset, loader, epoch) for epoch in (0, 1)]
    assert [len(e) for e in epochs] == [BATCHES_PER_EPOCH] * 2
    assert [b["captions"] for b in epochs[0]] != [b["captions"] for b in epochs[1]]  # each epoch its own order

    # A new process resumes in epoch 1 after 2 batches: the rest of the epoch is what the first run drew.
    accelerator, dataset, loader = _prepared(config, adapter, tmp_path)
    resumed = _epoch(accelerator, dataset, loader, 1, skip=2)
    assert len(resumed) == BATCHES_PER_EPOCH - 2
    for expected, got in zip(epochs[1][2:], resumed):
        assert got["captions"] == expected["captions"] and torch.equal(got[key], expected[key])
        assert all(torch.equal(got[k], expected[k]) for k in GEOMETRY_KEYS)


def test_cached_bucketed_samples_are_the_pixel_path_samples(tmp_path, tiny_sd, adapter, mixed):
    fields = dict(aspect_ratio_buckets=True, center_crop=True, random_flip=True, seed=5)
    cached_config = _config(tiny_sd, mixed[0], tmp_path, cache_latents=True, **fields)
    _, cached, _ = _prepared(cached_config, adapter, tmp_path)
    _, pixels, _ = _prepared(_config(tiny_sd, mixed[0], tmp_path, **fields), adapter, tmp_path)
    vae = adapter.vae
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        pixels.set_epoch(epoch)
        for i in range(len(cached)):
            a, b = cached[i], pixels[i]
            assert a["captions"] == b["captions"] and all(a[k] == b[k] for k in GEOMETRY_KEYS)
            from_cache = sample_latents(vae, a["latent_mean"][None], a["latent_std"][None], torch.manual_seed(i))
            from_pixels = encode(vae, b["pixel_values"][None], torch.manual_seed(i))
            torch.testing.assert_close(from_cache, from_pixels, rtol=1e-5, atol=1e-5)


def test_dit_refuses_buckets_and_the_text_cache_in_one_line(tmp_path, capsys):
    dit = build_tiny_dit_pipeline(tmp_path / "dit", num_classes=2)
    args = ["--pretrained", str(dit), "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    for flag, message in (("--aspect_ratio_buckets", "aspect_ratio_buckets: DiT trains on square images only"),
                          ("--cache_text_embeddings", "cache_text_embeddings: DiT is class-conditional")):
        assert main(args + [flag]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and f"drop {flag}" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_sd_trains_on_buckets_with_cached_latents_and_text_embeddings(tmp_path):
    base = build_tiny_sd_pipeline(tmp_path / "base")
    data, _ = build_mixed_aspect_folder(tmp_path / "data")
    out, text_cache = tmp_path / "out", tmp_path / "text-cache"
    args = tiny_run_args(base, data, out, steps=2) + [
        "--train_batch_size", "2", "--aspect_ratio_buckets", "--cache_latents", "--center_crop", "--random_flip",
        "--latent_cache_dir", str(tmp_path / "latents"), "--cache_text_embeddings", "--text_cache_dir", str(text_cache),
        "--validation_steps", "1", "--validation_prompts", "img-0", "a prompt of no caption"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "aspect-ratio buckets (h x w: images): 32x32: 4, 48x24: 4, 24x48: 4" in proc.stdout
    # 12 captions, the empty prompt and the validation prompt that is no caption
    assert len(list(text_cache.glob("*/*/*.safetensors"))) == 14
    assert {"step-1.png", "step-2.png", "final.png"} <= {p.name for p in (out / "samples").iterdir()}
    # The released text encoder is back in the export, bit for bit the base's.
    a, b = (load_file(str(p / "text_encoder" / "model.safetensors")) for p in (out, base))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
