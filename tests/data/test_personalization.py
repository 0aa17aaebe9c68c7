"""Personalization: caption conventions (sidecars, metadata.jsonl, kohya <N>_<name> folders, --instance_prompt,
--caption_prefix), repeats, DreamBooth prior preservation (class images, batch composition, loss) and masked loss
(pixel path, latent cache, zero gradient outside the mask), unit by unit; end to end on tiny SD and tiny SD3."""

import hashlib
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from sadm_finetune.config.run import DataConfig, build_config

from sadm_finetune.terms.sadm.config import SADMConfig
from sadm_finetune.data.datasets import ImageTransform, TrainDataset, collate, open_train_data
from sadm_finetune.utils.errors import ConfigError, InputError
from sadm_finetune.data.latent_cache import CachedLatentDataset, build_latent_cache, cache_key
from sadm_finetune.diffusion.latents import latent_loss_mask, latent_mask
from sadm_finetune.diffusion.losses import LearnedSigmaVLB, masked_mean, weighted_mean
from sadm_finetune.terms.sadm.discriminator import StructureDiscriminator
from sadm_finetune.families.text import caption_prompts
from sadm_finetune.diffusion.process import make_process
from sadm_finetune.data.prior import (PriorPreservationCollate, PriorPreservationDataset, class_image_files,
                                 generate_class_images, open_class_data)
from sadm_finetune.terms.sadm.objective import SADMObjective
from sadm_finetune.terms import StepContext


def _image(path, value=0, size=(40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray((rng.random((size[0], size[1], 3)) * 255).astype(np.uint8)).save(path)
    return path


def _captions_by_file(data):
    rows = data.dataset.select_columns([data.image_column, data.caption_column])
    return [(os.path.basename(r[data.image_column]["path"]), r[data.caption_column]) for r in rows]


# -- captions and repeats --------------------------------------------------------------------------------------------

def test_caption_precedence_kohya_repeats_and_prefix(tmp_path):
    """sidecar > metadata.jsonl > kohya folder name > --instance_prompt, each prefixed; <N>_ folders repeat N times."""
    root = tmp_path / "data"
    for name in ("a", "b", "c"):
        _image(root / "3_sks dog" / f"{name}.png")
    _image(root / "1_other" / "d.png")
    (root / "3_sks dog" / "a.txt").write_text("from the sidecar\nsecond line ignored\n")
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"file_name": "3_sks dog/a.png", "text": "metadata loses to the sidecar"},
        {"file_name": "3_sks dog/b.png", "text": "from metadata"})) + "\n")
    data = open_train_data(DataConfig(train_data_dir=str(root), caption_prefix="ohwx", dataset_repeats=2,
                                      instance_prompt="never used: every image has a caption"))
    got = _captions_by_file(data)
    assert sorted(set(got)) == [("a.png", "ohwx from the sidecar"), ("b.png", "ohwx from metadata"),
                                ("c.png", "ohwx sks dog"), ("d.png", "ohwx other")]
    counts = {n: sum(1 for m, _ in got if m == n) for n in ("a.png", "b.png", "c.png", "d.png")}
    assert counts == {"a.png": 6, "b.png": 6, "c.png": 6, "d.png": 2} and len(data) == 20
    assert data.label_column is None and "kohya folders 1_other (x1), 3_sks dog (x3)" in data.description
    # Each repeat is its own sample: crops and flips are drawn per index, not per file.
    ds = TrainDataset(data, ImageTransform(32, center_crop=False, random_flip=True), seed=0)
    rows = [i for i, (n, _) in enumerate(got) if n == "a.png"]
    assert len({tuple(ds[i]["crop_top_lefts"]) + (ds[i]["flips"],) for i in rows}) > 1


def test_instance_prompt_captions_a_folder_and_is_the_validation_default(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        _image(root / f"{i}.png", i)
    (root / "0.txt").write_text("sks dog on the grass")
    cfg = DataConfig(train_data_dir=str(root), instance_prompt="a photo of sks dog", caption_prefix="ohwx")
    data = open_train_data(cfg)
    assert dict(_captions_by_file(data)) == {"0.png": "ohwx sks dog on the grass", "1.png": "ohwx a photo of sks dog",
                                             "2.png": "ohwx a photo of sks dog"}
    assert data.instance_prompt == "ohwx a photo of sks dog"
    assert caption_prompts(data, "Stable Diffusion") == ["ohwx a photo of sks dog"]  # the validation default
    # Trigger words alone: the prefix is every caption; the grid's default is then the data's first captions.
    prefix_only = open_train_data(DataConfig(train_data_dir=str(tmp_path / "data"), caption_extension="caption",
                                             caption_prefix="sks"))
    assert {c for _, c in _captions_by_file(prefix_only)} == {"sks"} and prefix_only.instance_prompt is None


def test_a_missing_caption_is_a_one_line_error_naming_the_image(tmp_path):
    root = tmp_path / "data"
    _image(root / "cat.png", 0)
    _image(root / "dog.png", 1)
    (root / "cat.txt").write_text("a cat")
    with pytest.raises(InputError, match=r"image .*dog\.png has no caption \(no dog\.txt beside it.*--instance_prompt"):
        open_train_data(DataConfig(train_data_dir=str(root)))
    assert len(open_train_data(DataConfig(train_data_dir=str(root), instance_prompt="a pet"))) == 2
    (root / "dog.txt").write_text("")
    with pytest.raises(InputError, match=r"caption file .*dog\.txt is empty"):
        open_train_data(DataConfig(train_data_dir=str(root)))
    # No caption anywhere: a text family's check says every way to add one.
    bare = tmp_path / "bare"
    _image(bare / "x.png")
    with pytest.raises(InputError, match=r"Stable Diffusion needs one caption per image: put a \.txt file beside"):
        caption_prompts(open_train_data(DataConfig(train_data_dir=str(bare))), "Stable Diffusion")


def test_kohya_folders_must_all_be_named_and_repeat_at_least_once(tmp_path):
    _image(tmp_path / "mixed" / "10_sks dog" / "a.png")
    _image(tmp_path / "mixed" / "cat" / "b.png")
    with pytest.raises(InputError, match=r"subfolders \['cat'\] .* are not named <repeats>_<name>"):
        open_train_data(DataConfig(train_data_dir=str(tmp_path / "mixed")))
    _image(tmp_path / "zero" / "0_sks dog" / "a.png")
    with pytest.raises(InputError, match="repeats its images 0 times"):
        open_train_data(DataConfig(train_data_dir=str(tmp_path / "zero")))
    # Class subfolders without captions keep their meaning: sorted names -> ids.
    _image(tmp_path / "classes" / "cat" / "a.png")
    _image(tmp_path / "classes" / "dog" / "b.png")
    classes = open_train_data(DataConfig(train_data_dir=str(tmp_path / "classes"), dataset_repeats=3))
    assert classes.id2label == {0: "cat", 1: "dog"} and len(classes) == 6


def test_a_datasets_set_gets_the_instance_prompt_prefix_repeats_and_its_mask_column(tmp_path):
    import datasets

    rows = {"image": [Image.new("RGB", (16, 16), (i * 50, 0, 0)) for i in range(3)],
            "text": ["a red square", None, "a blue square"],
            "mask": [Image.new("L", (16, 16), 255 * (i % 2)) for i in range(3)]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "mask": datasets.Image()})
    (tmp_path / "set").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "set" / "train.parquet"))
    cfg = DataConfig(dataset_name=str(tmp_path / "set"), instance_prompt="sks", caption_prefix="ohwx",
                     mask_column="mask", dataset_repeats=2, label_column=None)
    data = open_train_data(cfg)
    assert len(data) == 6 and data.mask_column == "mask"
    assert sorted(set(data.dataset["text"])) == ["ohwx a blue square", "ohwx a red square", "ohwx sks"]
    sample = TrainDataset(data, ImageTransform(16, True, False))[2]
    assert sample["masks"].shape == (1, 16, 16) and float(sample["masks"].mean()) == 1.0
    with pytest.raises(ConfigError, match="mask_column: 'nope' is not a column"):
        open_train_data(DataConfig(dataset_name=str(tmp_path / "set"), mask_column="nope"))
    with pytest.raises(ConfigError, match="mask_column: names a column of a --dataset_name set"):
        DataConfig(train_data_dir="x", mask_column="mask")


# -- prior preservation --------------------------------------------------------------------------------------------

class _Fake(torch.utils.data.Dataset):
    def __init__(self, name, n, masks=False):
        self.name, self.n, self.masks, self.epochs = name, n, masks, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        sample = {"pixel_values": torch.full((3, 4, 4), float(i)), "captions": f"{self.name} {i}",
                  "original_sizes": (4, 4), "crop_top_lefts": (0, 0), "target_sizes": (4, 4), "flips": False}
        if self.masks:
            sample["masks"] = torch.zeros(1, 4, 4)
        return sample


def test_prior_batch_is_instances_then_classes_and_the_loss_is_diffusers(tmp_path):
    dataset = PriorPreservationDataset(_Fake("instance", 3, masks=True), _Fake("class", 5))
    assert len(dataset) == 5 and dataset[4]["instance"]["captions"] == "instance 1"  # i mod n, as diffusers pairs
    dataset.set_epoch(2)
    assert dataset.instances.epochs == dataset.classes.epochs == [2]
    batch = PriorPreservationCollate(prior_loss_weight=0.5)([dataset[0], dataset[4]])
    assert batch["captions"] == ["instance 0", "instance 1", "class 0", "class 4"]
    assert batch["pixel_values"].shape == (4, 3, 4, 4) and batch["flips"].shape == (4,)
    # Class images have no masks: ones beside the instances' masks.
    assert batch["masks"][:2].eq(0).all() and batch["masks"][2:].eq(1).all()
    # instance mean + w * class mean, by hand: (1 + 2) / 2 + 0.5 * (3 + 4) / 2 = 3.25
    assert weighted_mean(torch.tensor([1.0, 2.0, 3.0, 4.0]), batch["loss_weights"]).item() == pytest.approx(3.25)
    # ... and diffusers' formula on a real prediction: chunk, two MSEs, loss + w * prior_loss.
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    per_sample = masked_mean((pred - target).pow(2))
    p, pp = pred.chunk(2)
    t, tp = target.chunk(2)
    expected = F.mse_loss(p, t) + 0.5 * F.mse_loss(pp, tp)
    torch.testing.assert_close(weighted_mean(per_sample, batch["loss_weights"]), expected)


class _FakePipeline:
    """A text-to-image pipeline whose images depend on each generator's seed only."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, generator, output_type, **kwargs):
        self.calls.append((len(prompt), kwargs))
        images = [Image.fromarray((torch.rand(8, 8, 3, generator=g).numpy() * 255).astype(np.uint8)) for g in generator]
        return SimpleNamespace(images=images)


def test_class_images_are_generated_batched_resumable_and_only_when_missing(tmp_path):
    fresh, resumed = _FakePipeline(), _FakePipeline()
    written = generate_class_images(fresh, tmp_path / "fresh", "a dog", 5, batch_size=2, seed=3,
                                    num_inference_steps=2, progress=False)
    assert fresh.calls == [(2, {"num_inference_steps": 2}), (2, {"num_inference_steps": 2}),
                           (1, {"num_inference_steps": 2})]
    assert [p.name.split("-")[0] for p in class_image_files(tmp_path / "fresh")] == ["0", "1", "2", "3", "4"]
    name = written[0].name  # <index>-<sha1 of the image's pixels>.jpg, as diffusers names them
    assert name == f"0-{hashlib.sha1(fresh_image_bytes(tmp_path, 3, 0)).hexdigest()}.jpg"
    # An interrupted run (2 images), resumed: the 2 are kept as they are, 3 are added, and the folder holds the
    # images an uninterrupted run makes.
    generate_class_images(resumed, tmp_path / "resumed", "a dog", 2, batch_size=2, seed=3, progress=False)
    kept = {p: p.stat().st_mtime_ns for p in class_image_files(tmp_path / "resumed")}
    generate_class_images(resumed, tmp_path / "resumed", "a dog", 5, batch_size=2, seed=3, progress=False)
    assert [n for n, _ in resumed.calls] == [2, 2, 1] and all(p.stat().st_mtime_ns == m for p, m in kept.items())
    assert [p.name for p in class_image_files(tmp_path / "resumed")] == \
        [p.name for p in class_image_files(tmp_path / "fresh")]
    # Enough images already: no call; the first N (index order) train, each captioned with the class prompt.
    assert generate_class_images(resumed, tmp_path / "resumed", "a dog", 4, 2, 3, progress=False) == []
    assert len(resumed.calls) == 3
    config = build_config({"pretrained_model_name_or_path": "p", "train_data_dir": "d", "with_prior_preservation": True,
                           "class_prompt": "a dog", "class_data_dir": str(tmp_path / "resumed"), "num_class_images": 4})
    classes = open_class_data(config)
    assert len(classes) == 4 and set(classes.dataset["text"]) == {"a dog"}
    assert [os.path.basename(v["path"]).split("-")[0] for v in classes.dataset["image"]] == ["0", "1", "2", "3"]


def fresh_image_bytes(tmp_path, seed, index):
    from sadm_finetune.data.prior import _image_seed

    g = torch.Generator().manual_seed(_image_seed(seed, index))
    return Image.fromarray((torch.rand(8, 8, 3, generator=g).numpy() * 255).astype(np.uint8)).tobytes()


def test_prior_preservation_options_are_checked_before_any_model_loads():
    base = {"pretrained_model_name_or_path": "p", "train_data_dir": "d"}
    with pytest.raises(ConfigError, match="class_prompt: is required with --with_prior_preservation"):
        build_config({**base, "with_prior_preservation": True, "class_data_dir": "c"})
    with pytest.raises(ConfigError, match="class_data_dir: is given without --with_prior_preservation"):
        build_config({**base, "class_data_dir": "c"})
    prior = {**base, "with_prior_preservation": True, "class_prompt": "a dog", "class_data_dir": "c"}
    with pytest.raises(ConfigError, match="aspect_ratio_buckets: cannot be combined with --with_prior_preservation"):
        build_config({**prior, "aspect_ratio_buckets": True})
    assert build_config({**prior, "train_batch_size": 1}).training.train_batch_size == 1  # 1 + 1: pairs for SADM


def test_a_class_conditional_family_refuses_prompts_and_kohya_folders(tmp_path):
    from sadm_finetune.families.dit import DiTAdapter
    from sadm_finetune.families.sd import StableDiffusionAdapter
    from sadm_finetune.data.prior import check_personalization

    _image(tmp_path / "10_sks dog" / "a.png")
    kohya = open_train_data(DataConfig(train_data_dir=str(tmp_path)))
    base = {"pretrained_model_name_or_path": "p", "train_data_dir": str(tmp_path)}
    prior = {**base, "with_prior_preservation": True, "class_prompt": "a dog", "class_data_dir": "c"}
    # The options: refused by the family's declaration (no "text"), before the data is opened.
    with pytest.raises(ConfigError, match="with_prior_preservation: needs a text-to-image pipeline"):
        DiTAdapter.check_config(build_config(prior))
    with pytest.raises(ConfigError, match="instance_prompt: needs a text-to-image pipeline"):
        DiTAdapter.check_config(build_config({**base, "instance_prompt": "sks"}))
    with pytest.raises(InputError, match="kohya's <repeats>_<name> folder convention .* rename the class folders"):
        check_personalization(build_config(base), DiTAdapter, kohya)
    StableDiffusionAdapter.check_config(build_config(prior))  # a text family takes all of it
    check_personalization(build_config(prior), StableDiffusionAdapter, kohya)


# -- masks -----------------------------------------------------------------------------------------------------------

def test_masked_mean_is_kohyas_normalisation():
    values = torch.ones(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :4, :4] = 1  # a quarter of sample 0
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(masked_mean(values), torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_a_masked_out_region_gets_no_gradient(scheduler):
    """d loss / d model_pred is exactly 0 where the latent mask is 0: the diffusion loss, DiT's VLB and SADM's
    structure term (z0 and x0_hat both masked before D), as the loop computes them."""
    torch.manual_seed(0)
    process = make_process({"_class_name": scheduler, "num_train_timesteps": 1000}, "cpu")
    latents, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    timesteps = process.sample_timesteps(4, torch.Generator().manual_seed(0), torch.device("cpu"))
    noisy = process.add_noise(latents, noise, timesteps)
    pixel_masks = torch.ones(4, 1, 32, 32)
    pixel_masks[:, :, :, :16] = 0  # the left half of every image
    pixel_masks[:, :, :, 16:20] = 0.5  # a grey band: weighted, not ignored
    batch = {"masks": pixel_masks, "loss_weights": torch.tensor([2.0, 2.0, 1.0, 1.0])}
    mask = latent_loss_mask(batch, latents)
    assert mask.shape == (4, 1, 8, 8) and mask[..., :4].eq(0).all() and mask[..., 4].eq(0.5).all()
    pred = torch.randn(4, 4, 8, 8, requires_grad=True)
    x0_hat = process.x0_hat(pred, noisy, timesteps)
    ctx = StepContext(0, batch, latents, noise, timesteps, noisy, {}, pred, x0_hat, torch.Generator(), loss_mask=mask)
    disc = StructureDiscriminator(in_channels=4, base_channels=8, num_blocks=2, embed_dim=16)
    structure, _ = SADMObjective(SADMConfig(), process).generator_loss(disc, *ctx.structure_inputs(), timesteps, None)
    loss = weighted_mean(process.diffusion_loss(SimpleNamespace(snr_gamma=None))(
        pred, process.target(latents, noise, timesteps), timesteps, mask), batch["loss_weights"]) + 10 * structure
    if process.betas is not None:  # DDPM: the learned-sigma bound sees the mask too
        variance = torch.zeros(4, 4, 8, 8, requires_grad=True)
        vlb = LearnedSigmaVLB(process.betas)(pred, variance, latents, noisy, timesteps.clamp(min=1), mask)
        (grad_v,) = torch.autograd.grad(vlb.mean(), variance, retain_graph=True)
        assert grad_v[..., :4].eq(0).all() and grad_v[..., 4:].abs().gt(0).any()
    (grad,) = torch.autograd.grad(loss, pred)
    assert grad[..., :4].eq(0).all(), "the masked-out region got a gradient"
    assert grad[..., 4:].abs().gt(0).all()
    # Without the mask the left half learns too (the test can fail).
    (unmasked,) = torch.autograd.grad(masked_mean((pred - noise).pow(2)).mean(), pred)
    assert unmasked[..., :4].abs().gt(0).all()


def _masked_folder(root, size=(32, 48)):
    """Images whose red channel IS their mask (left part white), so that the mask can be checked against the pixels."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        mask = np.zeros(size, np.uint8)
        mask[:, : 10 + 8 * i] = 255
        Image.fromarray(np.stack([mask] * 3, -1)).save(root / f"{i}.png")
        Image.fromarray(mask).save(root / f"{i}_mask.png")
    (root / "lonely_mask.png").write_bytes((root / "0.png").read_bytes())  # no lonely.png: an image, not a mask
    return root


def test_masks_are_cropped_and_flipped_with_their_image(tmp_path):
    data = open_train_data(DataConfig(train_data_dir=str(_masked_folder(tmp_path / "d")), instance_prompt="x"))
    assert len(data) == 4 and data.mask_column == "mask" and "3 of 4 images masked" in data.description
    ds = TrainDataset(data, ImageTransform(32, center_crop=False, random_flip=True), seed=1)
    flips = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            sample = ds[i]
            flips.add(sample["flips"])
            if data.dataset[i]["mask"] is None:  # lonely_mask.png: an image without a mask trains everywhere
                assert sample["masks"].eq(1).all()
                continue
            # 32 x 48 images at resolution 32: no resize, a random crop across the width, maybe a flip.
            torch.testing.assert_close(sample["masks"], (sample["pixel_values"][:1] + 1) / 2, atol=1e-6, rtol=0)
    assert flips == {True, False}
    batch = collate([ds[0], ds[1]])
    assert batch["masks"].shape == (2, 1, 32, 32)
    # In an aspect-ratio bucket (resized to cover 24 x 40, then cropped) the mask still covers what it covered.
    bucketed = TrainDataset(data, ImageTransform(32, center_crop=False, random_flip=True), seed=1,
                            target_sizes=[(24, 40)] * len(data))
    for i in range(3):
        sample = bucketed[i]
        assert sample["masks"].shape == (1, 24, 40)
        assert (sample["masks"] - (sample["pixel_values"][:1] + 1) / 2).abs().mean() < 0.02  # resampling filters


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from tiny_pipelines import build_tiny_dit_pipeline

    path = build_tiny_dit_pipeline(tmp_path_factory.mktemp("dit"), num_classes=2)
    return AutoencoderKL.from_pretrained(path, subfolder="vae").eval()


def test_masks_are_cached_with_the_latents_and_in_the_key(tmp_path, vae):
    from accelerate import Accelerator

    folder = _masked_folder(tmp_path / "d")
    cfg = DataConfig(train_data_dir=str(folder), instance_prompt="x", center_crop=True, random_flip=True,
                     cache_latents=True, latent_cache_dir=str(tmp_path / "cache"))
    data = open_train_data(cfg)
    cache = build_latent_cache(Accelerator(cpu=True), vae, data, cfg, 32, batch_size=4)
    cached = CachedLatentDataset(data, cache, random_flip=True, seed=0)
    pixels = TrainDataset(data, ImageTransform(32, center_crop=True, random_flip=True), seed=0)
    for epoch in range(2):
        cached.set_epoch(epoch)
        pixels.set_epoch(epoch)
        for i in range(len(data)):
            a, b = cached[i], pixels[i]
            assert a["flips"] == b["flips"]
            torch.testing.assert_close(a["latent_masks"], latent_mask(b["masks"][None], (8, 8))[0])
    # The key: no masks, masks, a changed mask file: three entries.
    unmasked = open_train_data(DataConfig(train_data_dir=str(_image(tmp_path / "plain" / "0.png").parent)))
    keys = [cache_key(vae, data, 32, True)]
    assert "masks" not in cache_key(vae, unmasked, 32, True)
    mask = folder / "1_mask.png"
    Image.new("L", (48, 32), 255).save(mask)
    os.utime(mask, ns=(1, 1))
    keys.append(cache_key(vae, open_train_data(cfg), 32, True))
    assert keys[0]["data"] == keys[1]["data"] and keys[0]["masks"] != keys[1]["masks"]


# -- end to end ------------------------------------------------------------------------------------------------------

def _subject_folder(root, kohya: bool):
    """Three 40 x 40 images of a 'subject' with masks (left half trains); in a kohya `5_sks dog` folder, or flat."""
    folder = root / "5_sks dog" if kohya else root
    for i in range(3):
        _image(folder / f"{i}.png", i)
        mask = np.zeros((40, 40), np.uint8)
        mask[:, :20] = 255
        Image.fromarray(mask).save(folder / f"{i}_mask.png")
    return root


def _dreambooth_args(base, data, out, class_dir):
    from launch import tiny_run_args

    return tiny_run_args(base, data, out, steps=3) + [
        "--trainable", "lora", "--lora_rank", "4", "--train_batch_size", "2", "--with_prior_preservation",
        "--class_prompt", "a photo of a dog", "--class_data_dir", str(class_dir), "--num_class_images", "3",
        "--prior_loss_weight", "0.5", "--sample_batch_size", "2", "--class_inference_steps", "2", "--report_to", "none"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_dreambooth_lora_with_prior_preservation_on_tiny_sd(tmp_path, family, monkeypatch):
    """kohya folder (repeats, folder-name caption), masks, class images generated by the base pipeline, SADM on; the
    loop weighs the diffusion loss per sample and hands the loss mask to the diffusion loss and the structure term."""
    from huggingface_hub import ModelCard

    from launch import train_in_process
    from sadm_finetune.train import loop
    from sadm_finetune.diffusion import process as noise
    from tiny_sd import build_tiny_sd_pipeline
    from tiny_sdxl import build_tiny_sdxl_pipeline

    seen = {"weights": [], "loss_masks": [], "structure_masks": []}
    weighted, timestep_loss, structure_inputs = loop.weighted_mean, noise.TimestepLoss.__call__, \
        StepContext.structure_inputs

    def record_weights(values, weights=None):
        seen["weights"].append(None if weights is None else weights.tolist())
        return weighted(values, weights)

    def record_loss_mask(self, pred, target, timesteps, mask=None):
        seen["loss_masks"].append(None if mask is None else mask.clone())
        return timestep_loss(self, pred, target, timesteps, mask)

    def record_structure_mask(self):
        seen["structure_masks"].append(self.loss_mask is not None)
        return structure_inputs(self)

    monkeypatch.setattr(loop, "weighted_mean", record_weights)
    monkeypatch.setattr(noise.TimestepLoss, "__call__", record_loss_mask)
    monkeypatch.setattr(StepContext, "structure_inputs", record_structure_mask)
    base = (build_tiny_sd_pipeline if family == "sd" else build_tiny_sdxl_pipeline)(tmp_path / "base")
    data, out, class_dir = _subject_folder(tmp_path / "data", kohya=True), tmp_path / "out", tmp_path / "class"
    proc = train_in_process(_dreambooth_args(base, data, out, class_dir) + ["--caption_prefix", "ohwx"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 2 instance + 2 class samples: n / n_instance = 2, prior_loss_weight * n / n_class = 0.5 * 2 = 1.
    assert seen["weights"] == [[2.0, 2.0, 1.0, 1.0]] * 3
    masks = seen["loss_masks"]
    assert len(masks) == 3 and all(m.shape == (4, 1, 8, 8) for m in masks)
    # Instances: the left half of the latent grid trains (the masks' left 20 of 40 pixels, resized to 32, the edge
    # blended); class images everywhere.
    assert all(m[:2, ..., :3].eq(1).all() and m[:2, ..., 5:].eq(0).all() and m[2:].eq(1).all() for m in masks)
    assert seen["structure_masks"] and all(seen["structure_masks"])
    assert "generating 3 of 'a photo of a dog'" in proc.stdout
    assert "captions from folder (3); kohya folders 5_sks dog (x5); 3 of 3 images masked" in proc.stdout
    assert "each batch 2 instance + 2 class samples" in proc.stdout and "SADM: lambda 0.01" in proc.stdout
    assert len(class_image_files(class_dir)) == 3
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    card = ModelCard.load(out / "README.md")
    assert card.data.instance_prompt == "ohwx" and card.data.widget[0]["text"] == "ohwx sks dog"
    assert "Prior preservation (DreamBooth): 3 class images of `a photo of a dog`" in card.text
    assert "Use `ohwx` in the prompt" in card.text and 'pipe("ohwx sks dog"' in card.text


@pytest.mark.slow
def test_dreambooth_lora_with_prior_preservation_on_tiny_sd3(tmp_path):
    """Flow matching, with the latents (masks included) and text embeddings cached; --instance_prompt captions the
    folder and is the validation prompt and the card's trigger words."""
    from huggingface_hub import ModelCard

    from launch import train_in_process
    from tiny_sd3 import build_tiny_sd3_pipeline

    base = build_tiny_sd3_pipeline(tmp_path / "base")
    data, out, class_dir = _subject_folder(tmp_path / "data", kohya=False), tmp_path / "out", tmp_path / "class"
    args = _dreambooth_args(base, data, out, class_dir) + [
        "--instance_prompt", "a photo of sks dog", "--cache_latents", "--center_crop", "--random_flip",
        "--latent_cache_dir", str(tmp_path / "latents"), "--cache_text_embeddings", "--text_cache_dir",
        str(tmp_path / "text")]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("latent cache: encoding") == 2  # the instance images, then the class images
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "latents").glob("*/manifest.json")]
    assert sorted("masks" in m for m in manifests) == [False, True]
    assert len(class_image_files(class_dir)) == 3
    card = ModelCard.load(out / "README.md")
    assert card.data.instance_prompt == "a photo of sks dog"
    assert card.data.widget[0]["text"] == "a photo of sks dog"


def test_the_personalization_benchmark_plans_resolvable_runs_and_measures(tmp_path):
    """benchmarks/personalization_digits.py, not the study: its --dry_run builds the data and the untrained base and
    checks every planned command with sadm-train --dry_run; its metrics on real digits and on the untrained base."""
    from benchmarks.personalization_digits import classify, evaluate, is_inverted, is_styled, main
    from sadm_finetune.data.digits import load_digits_images
    from sadm_finetune.evaluation.features import DIGITS_CLASSIFIER_PATH, load_classifier

    out = main(["--dry_run", "--seeds", "0", "1", "--variants", "plain,prior+sadm", "--subject_images", "4",
                "--base_images", "20", "--work_dir", str(tmp_path)])
    assert out["plan"] == ["base", "plain/0", "plain/1", "prior+sadm/0", "prior+sadm/1"]
    subjects = sorted(p.name for p in tmp_path.glob("subject_*"))
    assert subjects == ["subject_mirrored_3_4_seed0", "subject_mirrored_3_4_seed1"]  # the default subject: mirrored
    digits, labels = load_digits_images(32)
    real = digits[labels == 3][:20] / 255.0
    subject = tmp_path / "subject_mirrored_3_4_seed0"
    images = np.stack([np.asarray(Image.open(p)) for p in sorted(subject.glob("*.png"))])
    classifier = load_classifier(DIGITS_CLASSIFIER_PATH)
    threes = np.full(20, 3)
    # the detectors: a mirrored 3 is styled, a plain 3 is not; an inverted digit has a light border, a plain one not
    assert len(images) == 4 and is_styled(classifier, images / 255.0, threes[:4], "mirrored").all()
    assert is_styled(classifier, np.ascontiguousarray(real[:, :, ::-1]), threes, "mirrored").mean() > 0.9
    assert not is_styled(classifier, real, threes, "mirrored").any()
    assert is_inverted(1 - real).all() and not is_inverted(real).any()
    assert (classify(classifier, real) == 3).mean() > 0.9
    metrics = evaluate(tmp_path / "untrained_base", None, 3, samples=1, steps=2, guidance=1.0)
    assert set(metrics) == {"subject_style", "subject_digit", "class_drift", "other_accuracy", "style_leak"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
