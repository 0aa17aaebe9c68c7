"""Reference image sets for evaluation: listed up front (cheap, so bad inputs fail before any
sampling), pixels loaded on demand, centre-cropped to square at the samples' resolution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from ..utils.errors import ConfigError, InputError, first_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ReferenceSource(Protocol):
    """Where a reference set comes from (sadm-eval's EvalConfig is one); exactly one of dir / dataset."""

    reference_dir: str | None
    reference_dataset: str | None
    reference_split: str
    image_column: str
    label_column: str | None


@dataclass
class Reference:
    description: str  # identifies the set inside a reference-statistics cache
    name: str  # for people and model cards: no local paths
    num_images: int
    labels: np.ndarray | None  # (N,) class ids, or None for an unlabelled set
    label_names: list[str] | None
    load: Callable[[np.ndarray, int], np.ndarray]  # (indices, resolution) -> uint8 (n, R, R, 3)
    dataset_type: str = "imagefolder"


def _square(image: Any, resolution: int) -> np.ndarray:
    from PIL import Image

    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(image)


def _image_folder(root: str) -> Reference:
    from PIL import Image

    path = Path(root).expanduser()
    if not path.is_dir():
        raise InputError(f"--reference_dir: folder {root} not found; pass a folder of images (one subfolder per class)")
    class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    groups = [(d, sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)) for d in class_dirs]
    groups = [(d, files) for d, files in groups if files]
    if groups:
        files = [f for _, fs in groups for f in fs]
        labels = np.concatenate([np.full(len(fs), i) for i, (_, fs) in enumerate(groups)])
        names = [d.name for d, _ in groups]
    else:  # a flat folder: an unlabelled reference set
        files, labels, names = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS), None, None
    if not files:
        raise InputError(f"--reference_dir: no {'/'.join(IMAGE_EXTENSIONS)} images in {root} or its subfolders; "
                         "put the reference images there")

    def load(indices: np.ndarray, resolution: int) -> np.ndarray:
        def one(file: Path) -> np.ndarray:
            with Image.open(file) as image:
                return _square(image, resolution)

        return np.stack([one(files[i]) for i in indices])

    return Reference(f"dir:{path.resolve()} ({len(files)} images)", path.resolve().name, len(files), labels, names,
                     load)


def _digits() -> Reference:
    from ..data.digits import DIGITS_NAME, load_digits_images

    _, labels = load_digits_images(8)
    return Reference(DIGITS_NAME, "scikit-learn digits", len(labels), labels, [str(i) for i in range(10)],
                     lambda indices, resolution: load_digits_images(resolution)[0][indices], "sklearn-digits")


def _dataset(config: ReferenceSource) -> Reference:
    import datasets

    name = config.reference_dataset
    try:
        ds = datasets.load_dataset(name, split=config.reference_split)
    except Exception as e:  # offline, unknown name, bad split: one line, not a traceback
        raise InputError(f"--reference_dataset: cannot load {name} split {config.reference_split} "
                         f"({first_line(e)}); check the name, --reference_split and your network") from None
    if config.image_column not in ds.column_names:
        raise ConfigError("--image_column", f"{name} has no column {config.image_column!r} (it has {ds.column_names})",
                          "pass the image column's name")
    labels = names = None
    if config.label_column is not None:
        if config.label_column not in ds.column_names:
            raise ConfigError("--label_column", f"{name} has no column {config.label_column!r}",
                              "pass the label column's name, or 'none' for an unlabelled set")
        labels = np.asarray(ds[config.label_column], dtype=np.int64)
        feature = ds.features[config.label_column]
        names = list(feature.names) if hasattr(feature, "names") else [str(i) for i in range(labels.max() + 1)]

    def load(indices: np.ndarray, resolution: int) -> np.ndarray:
        images = ds.select(indices.tolist())[config.image_column]
        return np.stack([_square(image, resolution) for image in images])

    description = f"dataset:{name}[{config.reference_split}].{config.image_column}"
    name_split = f"{name} ({config.reference_split})"
    return Reference(description, name_split, len(ds), labels, names, load, dataset_type=name)


def open_reference(config: ReferenceSource) -> Reference:
    from ..data.digits import DIGITS_NAME

    if DIGITS_NAME in (config.reference_dataset, config.reference_dir):
        return _digits()
    return _image_folder(config.reference_dir) if config.reference_dir else _dataset(config)
