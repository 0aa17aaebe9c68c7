"""Training data: an image folder, a `datasets` set or the builtin digits -> pixel tensors + conditioning.

Images are read with PIL (no torchvision). An image folder whose images sit in subfolders gets one
class per subfolder, sorted by name (ids 0..K-1, the ImageNet convention); a flat folder is
unconditional; a folder with `metadata.jsonl` carries captions (the `datasets` imagefolder format).

Each sample carries its conditioning as data (docs/design.md §8): the caption or class id, and the
geometry of the image it was made from (`SampleGeometry`: original size, crop, flip, target size),
which SDXL-style micro-conditioning reads; `collate` turns them into per-sample tensors.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .config import DataConfig
from .demo_data import DIGITS_NAME, load_digits_images
from .errors import ConfigError, InputError, first_line

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class TrainData:
    dataset: Any  # datasets.Dataset with undecoded images
    image_column: str
    label_column: str | None
    caption_column: str | None
    id2label: dict[int, str] | None
    description: str  # for the model card and the run summary

    def __len__(self) -> int:
        return len(self.dataset)

    def max_class_id(self) -> int | None:
        if self.label_column is None:
            return None
        return int(max(self.dataset[self.label_column])) if len(self.dataset) else None


def _scan_folder(root: Path) -> tuple[list[Path], bool]:
    """Image files under root, and whether they all sit one level down (class subfolders)."""
    if not root.is_dir():
        raise InputError(f"train_data_dir: folder {root} not found; pass an existing image folder")
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not files:
        raise InputError(
            f"train_data_dir: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {root}; add images, one "
            "subfolder per class"
        )
    depths = {len(p.relative_to(root).parts) for p in files}
    return files, depths == {2}


def _from_folder(cfg: DataConfig) -> TrainData:
    import datasets

    root = Path(cfg.train_data_dir).expanduser()
    files, class_subfolders = _scan_folder(root)
    has_metadata = (root / "metadata.jsonl").is_file()
    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(root), split="train", drop_labels=not class_subfolders or has_metadata
    )
    label_column = "label" if "label" in ds.column_names else None
    id2label = None
    if label_column:
        id2label = dict(enumerate(ds.features["label"].names))
    caption_column = cfg.caption_column if cfg.caption_column in ds.column_names else None
    kind = f"{len(id2label)} classes" if id2label else ("captioned" if caption_column else "unconditional")
    return TrainData(ds, "image", label_column, caption_column, id2label, f"image folder {root} ({kind})")


def _from_digits(cfg: DataConfig) -> TrainData:
    import datasets

    images, labels = load_digits_images(32)
    names = [str(i) for i in range(10)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(img) for img in images], "label": labels.tolist()}, features=features
    )
    return TrainData(ds, "image", "label", None, dict(enumerate(names)), "scikit-learn digits, upscaled to 32x32")


def _from_hub(cfg: DataConfig) -> TrainData:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, split="train")
    except Exception as e:
        reason = first_line(e)
        raise InputError(f"dataset_name: cannot load {cfg.dataset_name!r} ({reason}); check the name, config and "
                         "network") from None
    if cfg.image_column not in ds.column_names:
        raise ConfigError("image_column", f"{cfg.image_column!r} is not a column of {cfg.dataset_name} "
                          f"({ds.column_names})", "pass --image_column <name>")
    label_column = cfg.label_column if cfg.label_column in ds.column_names else None
    id2label = None
    if label_column and isinstance(ds.features[label_column], datasets.ClassLabel):
        id2label = dict(enumerate(ds.features[label_column].names))
    caption_column = cfg.caption_column if cfg.caption_column in ds.column_names else None
    return TrainData(ds, cfg.image_column, label_column, caption_column, id2label, f"dataset {cfg.dataset_name}")


def open_train_data(cfg: DataConfig) -> TrainData:
    """Open the data source (cheap: no decoding); fails with one line on a missing or empty source."""
    import datasets

    if cfg.train_data_dir:
        data = _from_folder(cfg)
    elif cfg.dataset_name == DIGITS_NAME:
        data = _from_digits(cfg)
    else:
        data = _from_hub(cfg)
    ds = data.dataset
    if cfg.max_train_samples is not None:
        ds = ds.select(range(min(cfg.max_train_samples, len(ds))))
    if len(ds) == 0:
        raise InputError(f"train_data_dir: the data set {data.description} is empty; add images")
    # Decode ourselves, so that an unreadable file can be reported by name or skipped.
    data.dataset = ds.cast_column(data.image_column, datasets.Image(decode=False))
    return data


def caption_text(value: Any) -> str:
    """A caption as the prompt it stands for: a string as is, a missing caption as the empty prompt."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"caption_column: captions must be strings, got {type(value).__name__} ({value!r:.60}); "
                         "keep one caption per image")
    return value


# Batch keys of the geometry: (B, 2) int64 pairs, `flips` (B,) bool. The first two are the keys of diffusers'
# SDXL training script.
GEOMETRY_KEYS = ("original_sizes", "crop_top_lefts", "target_sizes", "flips")


@dataclass(frozen=True)
class SampleGeometry:
    """What one image went through on its way to the model, as (h, w) and (y, x) pairs: the inputs of SDXL's
    micro-conditioning (`original_size`, `crops_coords_top_left`, `target_size`). The crop is measured in the
    resized image as the model sees it, that is after a flip (the convention of diffusers' SDXL training)."""

    original_size: tuple[int, int]  # the source image
    resized_size: tuple[int, int]  # after the resize that covers the target size
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]  # the training image
    flipped: bool = False

    def flip(self) -> "SampleGeometry":
        """The same crop, mirrored: its left edge counted from the other side of the resized image."""
        y, x = self.crop_top_left
        mirrored_x = self.resized_size[1] - x - self.target_size[1]
        return replace(self, crop_top_left=(y, mirrored_x), flipped=not self.flipped)

    def as_sample(self) -> dict[str, Any]:
        return dict(zip(GEOMETRY_KEYS, (self.original_size, self.crop_top_left, self.target_size, self.flipped)))


class ImageTransform:
    """Resize to cover the target size (for a square: the short side to `resolution`), crop to it (center or
    random), flip at random; -> (3, H, W) in [-1, 1] and the sample's geometry."""

    def __init__(self, resolution: int, center_crop: bool, random_flip: bool) -> None:
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None,
                 target_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, SampleGeometry]:
        """`target_size` (h, w): an aspect-ratio bucket; default the square `resolution`."""
        image = image.convert("RGB")
        th, tw = target_size or (self.resolution, self.resolution)
        w, h = image.size
        original = (h, w)
        scale = max(th / h, tw / w)
        if scale != 1:
            size = (max(tw, round(w * scale)), max(th, round(h * scale)))
            image = image.resize(size, Image.BICUBIC)
        w, h = image.size
        if self.center_crop:
            left, top = (w - tw) // 2, (h - th) // 2
        else:
            left = int(torch.randint(0, w - tw + 1, (), generator=generator))
            top = int(torch.randint(0, h - th + 1, (), generator=generator))
        image = image.crop((left, top, left + tw, top + th))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
        geometry = SampleGeometry(original, (h, w), (top, left), (th, tw))
        if self.random_flip and torch.rand((), generator=generator) < 0.5:
            array = array[:, ::-1]
            geometry = geometry.flip()
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), geometry


def _open_image(value: dict[str, Any]) -> Image.Image:
    if value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    else:
        image = Image.open(value["path"])
    image.load()
    return image


class TrainDataset(torch.utils.data.Dataset):
    """Map-style dataset of {"pixel_values", geometry (GEOMETRY_KEYS), "class_labels"?, "captions"?} samples.

    `target_sizes`: the (h, w) each index trains at (its aspect-ratio bucket); default the square resolution.
    """

    def __init__(self, data: TrainData, transform: ImageTransform, on_bad_image: str = "error", seed: int = 0,
                 target_sizes: Sequence[tuple[int, int]] | None = None) -> None:
        self.data = data
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.num_skipped = 0
        self.seed = seed
        self.epoch = 0
        self.target_sizes = target_sizes

    def set_epoch(self, epoch: int) -> None:
        """Random crops and flips depend on (seed, epoch, index) only: replayable on resume, in any worker."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # An unreadable image is replaced by the next readable one, at this index's target size (so a batch
        # keeps one shape).
        target_size = None if self.target_sizes is None else tuple(int(v) for v in self.target_sizes[index])
        for attempt in range(len(self)):
            row = self.data.dataset[(index + attempt) % len(self)]
            value = row[self.data.image_column]
            generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index, attempt)) & (2**63 - 1))
            try:
                pixels, geometry = self.transform(_open_image(value), generator, target_size)
            except (OSError, ValueError, SyntaxError) as e:
                name = value.get("path") or f"row {(index + attempt) % len(self)}"
                if self.on_bad_image == "error":
                    raise InputError(f"train_data_dir: cannot read image {name} ({type(e).__name__}); remove it or "
                                     "pass --on_bad_image skip") from None
                self.num_skipped += 1
                logger.warning("skipping unreadable image %s (%d skipped so far)", name, self.num_skipped)
                continue
            sample: dict[str, Any] = {"pixel_values": pixels, **geometry.as_sample()}
            if self.data.label_column:
                sample["class_labels"] = int(row[self.data.label_column])
            if self.data.caption_column:
                sample["captions"] = row[self.data.caption_column]
            return sample
        raise InputError("train_data_dir: no image in the data set could be read; check the files")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (pixel_values, or cached latent_mean/latent_std); labels and geometry -> per-sample tensors;
    captions -> a list; cached text embeddings (a dict of tensors per sample) -> a dict of stacked tensors."""
    first = samples[0]
    batch: dict[str, Any] = {
        key: torch.stack([s[key] for s in samples]) for key, value in first.items() if torch.is_tensor(value)
    }
    if "class_labels" in first:
        batch["class_labels"] = torch.tensor([s["class_labels"] for s in samples], dtype=torch.long)
    for key in GEOMETRY_KEYS:
        if key in first:
            batch[key] = torch.tensor([s[key] for s in samples], dtype=torch.bool if key == "flips" else torch.long)
    if "captions" in first:
        batch["captions"] = [s["captions"] for s in samples]
    if "text_embeddings" in first:
        batch["text_embeddings"] = {name: torch.stack([s["text_embeddings"][name] for s in samples])
                                    for name in first["text_embeddings"]}
    return batch
