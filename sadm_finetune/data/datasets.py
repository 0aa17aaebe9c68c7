"""Training data: an image folder, a `datasets` set or the builtin digits -> pixel tensors + conditioning.

Images are read with PIL (no torchvision). An image folder (folder_data.py) carries captions (sidecar
`.txt` files, `metadata.jsonl`, kohya `<N>_<name>` folder names or --instance_prompt), else one class
per subfolder, sorted by name (ids 0..K-1, the ImageNet convention), else nothing (unconditional);
`<stem>_mask.png` files beside the images are loss masks, taken through each sample's crop and flip.

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

from ..config.run import DataConfig
from .digits import DIGITS_NAME, load_digits_images
from ..utils.errors import ConfigError, InputError, first_line

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
    mask_column: str | None = None  # loss masks (images; None values: the whole image trains)
    instance_prompt: str | None = None  # --instance_prompt with its prefix: the validation prompts' default
    repeats: list[int] | None = None  # per row, before open_train_data expands them (kohya folders)
    kohya: bool = False  # an image folder in kohya's <repeats>_<name> layout

    def __len__(self) -> int:
        return len(self.dataset)

    def max_class_id(self) -> int | None:
        if self.label_column is None:
            return None
        return int(max(self.dataset[self.label_column])) if len(self.dataset) else None


def _from_folder(cfg: DataConfig) -> TrainData:
    """An image folder (folder_data.py): captions (sidecars, metadata.jsonl, kohya folder names, --instance_prompt),
    else class subfolders or none; kohya repeats; `<stem>_mask.png` masks."""
    import datasets

    from .folder import describe_folder, read_folder

    root = Path(cfg.train_data_dir).expanduser()
    if not root.is_dir():
        raise InputError(f"train_data_dir: folder {root} not found; pass an existing image folder")
    images, kohya, captioned = read_folder(root, cfg, IMAGE_EXTENSIONS)
    columns: dict[str, list] = {"image": [str(image.path) for image in images]}
    features = {"image": datasets.Image(decode=False)}
    caption_column = label_column = mask_column = id2label = None
    class_subfolders = not kohya and all(len(image.path.relative_to(root).parts) == 2 for image in images)
    if captioned:
        caption_column = cfg.caption_column or "text"
        columns[caption_column] = [image.caption for image in images]
        features[caption_column] = datasets.Value("string")
    elif class_subfolders:
        names = sorted({image.top for image in images})
        label_column, id2label = "label", dict(enumerate(names))
        columns["label"] = [names.index(image.top) for image in images]
        features["label"] = datasets.ClassLabel(names=names)
    if any(image.mask is not None for image in images):
        mask_column = "mask"
        columns["mask"] = [None if image.mask is None else str(image.mask) for image in images]
        features["mask"] = datasets.Image(decode=False)
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    kind = f"{len(id2label)} classes" if id2label else ("captioned" if caption_column else "unconditional")
    data = TrainData(ds, "image", label_column, caption_column, id2label, describe_folder(root, images, kohya, kind),
                     mask_column=mask_column)
    data.repeats, data.kohya = [image.repeats for image in images], kohya
    return data


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
    mask_column = None
    if cfg.mask_column is not None:
        if cfg.mask_column not in ds.column_names:
            raise ConfigError("mask_column", f"{cfg.mask_column!r} is not a column of {cfg.dataset_name} "
                              f"({ds.column_names})", "pass --mask_column <name of the mask images' column>")
        if not isinstance(ds.features[cfg.mask_column], datasets.Image):
            raise ConfigError("mask_column", f"{cfg.mask_column!r} holds {type(ds.features[cfg.mask_column]).__name__} "
                              "values, not images", "name a column of mask images (white trains, black is ignored)")
        mask_column = cfg.mask_column
    return TrainData(ds, cfg.image_column, label_column, caption_column, id2label, f"dataset {cfg.dataset_name}",
                     mask_column=mask_column)


def _with_caption_rules(data: TrainData, cfg: DataConfig) -> None:
    """A `datasets` set's captions with --instance_prompt (for rows without one) and --caption_prefix applied; the
    column is replaced in memory (the images are not copied)."""
    if not (cfg.instance_prompt or cfg.caption_prefix):
        return
    from .folder import join_prefix

    ds = data.dataset
    column = data.caption_column or cfg.caption_column or "text"
    old = list(ds[column]) if data.caption_column else [None] * len(ds)
    captions = [join_prefix(cfg.caption_prefix, cfg.instance_prompt if c is None and cfg.instance_prompt
                            else caption_text(c)) for c in old]
    if data.caption_column:
        ds = ds.remove_columns(column)
    data.dataset, data.caption_column = ds.add_column(column, captions), column


def open_train_data(cfg: DataConfig) -> TrainData:
    """Open the data source (cheap: no decoding); fails with one line on a missing or empty source."""
    import datasets

    from .folder import instance_caption

    if cfg.train_data_dir:
        data = _from_folder(cfg)
    elif cfg.dataset_name == DIGITS_NAME:
        if cfg.mask_column is not None:
            raise ConfigError("mask_column", f"{DIGITS_NAME} has no mask column", "drop --mask_column")
        data = _from_digits(cfg)
    else:
        data = _from_hub(cfg)
    ds = data.dataset
    if cfg.max_train_samples is not None:
        ds = ds.select(range(min(cfg.max_train_samples, len(ds))))
    if len(ds) == 0:
        raise InputError(f"train_data_dir: the data set {data.description} is empty; add images")
    # Decode ourselves, so that an unreadable file can be reported by name or skipped.
    for column in (data.image_column, data.mask_column):
        if column is not None:
            ds = ds.cast_column(column, datasets.Image(decode=False))
    data.dataset = ds
    if not cfg.train_data_dir:
        _with_caption_rules(data, cfg)
    data.instance_prompt = instance_caption(cfg) if data.caption_column else None
    # Repeats are rows (each repeat drawn afresh: crop, flip, noise): a kohya folder's N times --dataset_repeats.
    counts = np.asarray((data.repeats or [1] * len(data.dataset))[:len(data.dataset)]) * cfg.dataset_repeats
    if (counts != 1).any():
        data.dataset = data.dataset.select(np.repeat(np.arange(len(counts)), counts))
        data.description += f", {len(counts)} images repeated to {len(data.dataset)} samples per epoch"
    data.repeats = None
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


def load_mask(value: dict[str, Any] | None, geometry: SampleGeometry) -> torch.Tensor:
    """A loss mask taken through its image's resize, flip and crop (`geometry`): (1, H, W) float32 in [0, 1], the
    mask's grey level (white 1: trains, black 0: ignored). No mask (None): ones."""
    th, tw = geometry.target_size
    if value is None:
        return torch.ones(1, th, tw)
    name = value.get("path") or "a mask_column image"
    try:
        mask = _open_image(value)
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"train_data_dir: cannot read mask {name} ({type(e).__name__}); fix or remove it") from None
    h, w = geometry.original_size
    if mask.size != (w, h):
        raise InputError(f"train_data_dir: mask {name} is {mask.width}x{mask.height} pixels and its image {w}x{h}; "
                         "make each mask the size of its image")
    mask = mask.convert("L")
    rh, rw = geometry.resized_size
    if (rh, rw) != (h, w):
        mask = mask.resize((rw, rh), Image.BILINEAR)  # no overshoot: a black region stays exactly 0
    if geometry.flipped:  # the crop is counted after the flip
        mask = mask.transpose(Image.FLIP_LEFT_RIGHT)
    y, x = geometry.crop_top_left
    mask = mask.crop((x, y, x + tw, y + th))
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


class TrainDataset(torch.utils.data.Dataset):
    """Map-style dataset of {"pixel_values", geometry (GEOMETRY_KEYS), "class_labels"?, "captions"?, "masks"?}
    samples.

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
            if self.data.mask_column:  # (1, H, W): the loss mask through the same resize, crop and flip
                sample["masks"] = load_mask(row[self.data.mask_column], geometry)
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
