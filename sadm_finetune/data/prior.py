"""DreamBooth's prior preservation, as diffusers' train_dreambooth_lora_sdxl.py does it (README, Personalization).

- **Class images**: `class_data_dir` is topped up to `num_class_images` images of `class_prompt` made by the base
  pipeline before any training: on the main process (the others wait), `sample_batch_size` images per call,
  with a progress bar. Each image is named `<index>-<sha1 of its pixels>.jpg` (diffusers' names), written
  atomically, and drawn from its own generator seeded by (seed, index), so a run stopped half-way resumes where it
  stopped and gives the images an uninterrupted run would have given. Existing images are kept and never
  re-made; a folder that holds N or more is used as it is (its first N images, in index order).
- **Batches**: sample i of an epoch pairs instance i mod n_instance with class i mod n_class (diffusers'
  `DreamBoothDataset`); a batch is its `train_batch_size` instance samples, then their class samples (diffusers'
  `collate_fn`), so the denoiser and every loss term see 2 x train_batch_size samples.
- **Loss**: `loss_weights` (2B,) in the batch, n / n_instance for an instance sample and
  prior_loss_weight * n / n_class for a class sample, so that the loop's `weighted_mean` of the per-sample
  diffusion loss is instance mean + prior_loss_weight * class mean, diffusers' `loss + prior_loss_weight *
  prior_loss`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..config.run import RunConfig
from .datasets import IMAGE_EXTENSIONS, TrainData, collate
from ..utils.errors import InputError

logger = logging.getLogger(__name__)

_INDEX = re.compile(r"^(\d+)-")


def class_image_files(folder: Path) -> list[Path]:
    """The folder's images (hidden files left out), in index order (`<index>-...`), then by name."""
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
             and not p.name.startswith(".")]

    def order(path: Path) -> tuple[int, int, str]:
        match = _INDEX.match(path.name)
        return (0, int(match.group(1)), path.name) if match else (1, 0, path.name)

    return sorted(files, key=order)


def _image_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"class-image-{seed}-{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def save_atomically(image, path: Path) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    image.convert("RGB").save(tmp, format="JPEG", quality=95)
    os.replace(tmp, path)


def generate_class_images(pipeline: Callable[..., Any], folder: Path, prompt: str, num_images: int,
                          batch_size: int, seed: int, num_inference_steps: int | None = None,
                          progress: bool = True) -> list[Path]:
    """Top `folder` up to `num_images` images of `prompt` from `pipeline` (a diffusers text-to-image pipeline: called
    with `prompt`, `generator` lists and `num_inference_steps`, returning `.images` of PIL images); returns the files
    written. Image k of the folder (k = the count already there, then on) comes from its own generator."""
    folder.mkdir(parents=True, exist_ok=True)
    have = len(class_image_files(folder))
    todo = list(range(have, num_images))
    written: list[Path] = []
    if not todo:
        return written
    logger.info("generating %d class images of %r into %s", len(todo), prompt, folder)
    steps = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    for indices in tqdm(batches, desc="generating class images", disable=not progress):
        generators = [torch.Generator(device="cpu").manual_seed(_image_seed(seed, i)) for i in indices]
        images = pipeline(prompt=[prompt] * len(indices), generator=generators, output_type="pil", **steps).images
        for index, image in zip(indices, images):
            digest = hashlib.sha1(image.tobytes()).hexdigest()  # diffusers' name: index and content hash
            path = folder / f"{index}-{digest}.jpg"
            save_atomically(image, path)
            written.append(path)
    return written


def check_personalization(config: RunConfig, family: type, data: TrainData) -> None:
    """Before any weights load: kohya's captioned folders need a text-to-image family (a class-conditional one, DiT,
    would silently ignore their captions). The options (prior preservation, instance prompts, caption prefixes) are
    refused by the family's declaration (`FamilyAdapter.check_capabilities`: they need "text")."""
    if "text" in family.capabilities or not data.kohya:
        return
    words = family.describe()
    raise InputError(f"train_data_dir: {data.description} is read with kohya's <repeats>_<name> folder convention "
                     f"(captions and repeats) and {words['name']} is {words['conditioning']} and takes no prompts; "
                     "rename the class folders without a leading number and underscore")


def ensure_class_images(accelerator, adapter, config: RunConfig) -> None:
    """Generate the missing class images with the base pipeline (the adapter's, before any training), on the main
    process; every process returns once the folder is complete. The pipeline runs on the device under the run's
    autocast (the weights are not cast: the denoiser trains from them next); the VAE decodes outside it."""
    from ..train.validation import vae_outside_autocast

    p = config.dreambooth
    folder = Path(p.class_data_dir).expanduser()
    if accelerator.is_main_process:
        missing = p.num_class_images - len(class_image_files(folder))
        if missing > 0:
            accelerator.print(f"prior preservation: {len(class_image_files(folder))} class images in {folder}, "
                              f"generating {missing} of {p.class_prompt!r}")
            pipeline = adapter.export_pipeline(adapter.denoiser)
            pipeline.to(accelerator.device)
            pipeline.set_progress_bar_config(disable=True)
            was_training = adapter.denoiser.training
            adapter.denoiser.eval()
            try:
                with torch.no_grad(), accelerator.autocast(), vae_outside_autocast(pipeline.vae):
                    generate_class_images(pipeline, folder, p.class_prompt, p.num_class_images, p.sample_batch_size,
                                          config.training.seed or 0, p.class_inference_steps,
                                          progress=accelerator.is_local_main_process)
            finally:
                adapter.denoiser.train(was_training)
            del pipeline
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def open_class_data(config: RunConfig) -> TrainData:
    """The class images as training data: the folder's first `num_class_images`, each captioned `class_prompt`."""
    import datasets

    p = config.dreambooth
    folder = Path(p.class_data_dir).expanduser()
    files = class_image_files(folder)[:p.num_class_images]
    if not files:
        raise InputError(f"class_data_dir: no class images in {folder}; let the run generate them (it needs the "
                         "base pipeline) or add images of the class")
    ds = datasets.Dataset.from_dict(
        {"image": [str(f) for f in files], "text": [p.class_prompt] * len(files)},
        features=datasets.Features({"image": datasets.Image(decode=False), "text": datasets.Value("string")}))
    return TrainData(ds, "image", None, "text", None, f"{len(files)} class images in {folder} ({p.class_prompt!r})")


class PriorPreservationDataset(torch.utils.data.Dataset):
    """Sample i: instance i mod n_instance and class i mod n_class, as diffusers' DreamBoothDataset pairs them."""

    def __init__(self, instances: torch.utils.data.Dataset, classes: torch.utils.data.Dataset) -> None:
        self.instances, self.classes = instances, classes

    def set_epoch(self, epoch: int) -> None:
        self.instances.set_epoch(epoch)
        self.classes.set_epoch(epoch)

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"instance": self.instances[index % len(self.instances)],
                "class": self.classes[index % len(self.classes)]}


_MASK_KEYS = ("masks", "latent_masks")


def _size(batch: dict[str, Any]) -> int:
    return batch["pixel_values" if "pixel_values" in batch else "latent_mean"].shape[0]


def concat_batches(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two collated batches as one, `first`'s samples then `second`'s. A loss mask one side lacks is all ones there
    (class images have no masks)."""
    for key in _MASK_KEYS:
        for a, b in ((first, second), (second, first)):
            if key in a and key not in b:
                b[key] = torch.ones_like(a[key][:1]).expand(_size(b), *a[key].shape[1:])
    if first.keys() != second.keys():
        raise ValueError(f"instance and class batches differ in {sorted(first.keys() ^ second.keys())}")
    out: dict[str, Any] = {}
    for key, value in first.items():
        if torch.is_tensor(value):
            out[key] = torch.cat([value, second[key]])
        elif isinstance(value, dict):  # cached text embeddings
            out[key] = {name: torch.cat([tensor, second[key][name]]) for name, tensor in value.items()}
        else:
            out[key] = [*value, *second[key]]
    return out


def prior_loss_weights(num_instance: int, num_class: int, prior_loss_weight: float) -> torch.Tensor:
    """(n,) weights whose product with per-sample losses, averaged, is instance mean + w * class mean."""
    n = num_instance + num_class
    return torch.cat([torch.full((num_instance,), n / num_instance),
                      torch.full((num_class,), prior_loss_weight * n / num_class)])


class PriorPreservationCollate:
    """Collate of `PriorPreservationDataset` samples: the instance batch, then the class batch, and `loss_weights`.
    A class (not a closure) so that data-loader workers can pickle it."""

    def __init__(self, prior_loss_weight: float) -> None:
        self.prior_loss_weight = prior_loss_weight

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        instances = collate([s["instance"] for s in samples])
        classes = collate([s["class"] for s in samples])
        batch = concat_batches(instances, classes)
        batch["loss_weights"] = prior_loss_weights(len(samples), len(samples), self.prior_loss_weight)
        return batch
