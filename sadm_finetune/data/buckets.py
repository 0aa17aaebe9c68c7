"""Aspect-ratio buckets: each image trains at the bucket nearest its shape, and every batch is one bucket.

The buckets are diffusers' own (`training_utils.generate_aspect_ratio_buckets`): about resolution²
pixels each, over the common aspect ratios, every side a multiple of what the family's denoiser needs
(`FamilyAdapter.aspect_ratio_bucket_multiple`). An image goes to the bucket of nearest aspect ratio
(`training_utils.find_nearest_bucket`), is resized to cover it and cropped to it (`data.ImageTransform`);
its original size and crop travel with it as metadata.

`BucketBatchSampler` groups indices by bucket. The order comes from the `sampler` it wraps, a
`RandomSampler` that accelerate swaps for its seedable sampler at `prepare` (seeded by seed + epoch), so
`set_epoch` and `skip_first_batches` replay the data order on resume exactly as for unbucketed batches.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from diffusers.training_utils import find_nearest_bucket, generate_aspect_ratio_buckets
from PIL import Image
from tqdm.auto import tqdm

from .datasets import TrainData
from ..utils.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

UNREADABLE = -1  # bucket id of an image whose header cannot be read: never batched


def aspect_ratio_buckets(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """(h, w) buckets of about resolution² pixels, each side a multiple of `multiple`."""
    if resolution < multiple:
        raise ConfigError("resolution", f"{resolution} is below the bucket side multiple {multiple} of this model",
                          f"use --resolution {multiple} or more")
    return [(int(h), int(w)) for h, w in generate_aspect_ratio_buckets(resolution, divisibility=multiple)]


def _image_size(value: dict[str, Any]) -> tuple[int, int]:
    """(h, w) from the image header, without decoding the pixels."""
    source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
    with Image.open(source) as image:
        w, h = image.size
    return h, w


def read_image_sizes(data: TrainData, on_bad_image: str, rows: Sequence[int] | None = None,
                     progress: bool = False) -> np.ndarray:
    """(N, 2) int64 (h, w) of each row's image (of `rows`, default all), read from the file headers; an
    unreadable image raises (on_bad_image=error) or reads as (0, 0)."""
    ds = data.dataset if rows is None else data.dataset.select(rows)
    sizes = np.zeros((len(ds), 2), dtype=np.int64)
    values = ds.select_columns([data.image_column]).iter(batch_size=1024)
    bar = tqdm(total=len(ds), desc="reading image sizes", disable=not progress)
    i = 0
    for chunk in values:
        for value in chunk[data.image_column]:
            try:
                sizes[i] = _image_size(value)
            except (OSError, ValueError, SyntaxError) as e:
                if on_bad_image == "error":
                    name = value.get("path") or f"row {i if rows is None else rows[i]}"
                    raise InputError(f"train_data_dir: cannot read image {name} ({type(e).__name__}); remove it or "
                                     "pass --on_bad_image skip") from None
            i += 1
        bar.update(len(chunk[data.image_column]))
    bar.close()
    return sizes


def nearest_buckets(sizes: np.ndarray, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
    """(N,) bucket index of each (h, w), UNREADABLE where the size is (0, 0)."""
    ids = np.full(len(sizes), UNREADABLE, dtype=np.int64)
    memo: dict[tuple[int, int], int] = {}  # data sets repeat a few sizes many times
    for i, (h, w) in enumerate(sizes.tolist()):
        if h and w:
            if (h, w) not in memo:
                memo[(h, w)] = find_nearest_bucket(h, w, buckets)
            ids[i] = memo[(h, w)]
    return ids


def bucket_ids_of(target_sizes: np.ndarray, valid: np.ndarray, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
    """(N,) bucket index of each row's target size (h, w), UNREADABLE where the row is not valid."""
    index = {tuple(b): i for i, b in enumerate(buckets)}
    return np.array([index[(h, w)] if ok else UNREADABLE for (h, w), ok in zip(target_sizes.tolist(), valid.tolist())],
                    dtype=np.int64)


class BucketBatchSampler(torch.utils.data.BatchSampler):
    """Batches of `batch_size` indices of one bucket.

    Indices arrive in the order of `sampler`; each joins its bucket, and a bucket that holds
    `batch_size * group_size` indices is emitted as `group_size` consecutive batches. With `group_size` =
    the number of processes, accelerate's `BatchSamplerShard` deals those batches out one per process, so a
    step's global batch is one shape on every rank (the structure term relates samples across ranks). What
    is left in the buckets at the end of an epoch is dropped (a different remainder each epoch).
    """

    def __init__(self, sampler: torch.utils.data.Sampler, bucket_ids: Sequence[int], batch_size: int,
                 group_size: int = 1) -> None:
        super().__init__(sampler, batch_size, drop_last=True)
        self.bucket_ids = np.asarray(bucket_ids, dtype=np.int64)
        self.group_size = group_size
        counts = Counter(self.bucket_ids[self.bucket_ids != UNREADABLE].tolist())
        self.chunk = batch_size * group_size
        self.num_batches = sum(n // self.chunk for n in counts.values()) * group_size
        if self.num_batches == 0:
            raise ConfigError(
                "train_batch_size", f"no aspect-ratio bucket holds a global batch of {self.chunk} images (largest "
                f"bucket: {max(counts.values(), default=0)})", "lower --train_batch_size, add images, or drop "
                "--aspect_ratio_buckets")

    def __iter__(self) -> Iterator[list[int]]:
        pending: dict[int, list[int]] = {}
        for index in self.sampler:
            bucket = int(self.bucket_ids[index])
            if bucket == UNREADABLE:
                continue
            group = pending.setdefault(bucket, [])
            group.append(int(index))
            if len(group) == self.chunk:
                for start in range(0, self.chunk, self.batch_size):
                    yield group[start:start + self.batch_size]
                pending[bucket] = []

    def __len__(self) -> int:
        return self.num_batches


def describe_buckets(buckets: Sequence[tuple[int, int]], bucket_ids: np.ndarray) -> str:
    """One line for the run summary: images per bucket, and how many could not be read."""
    counts = Counter(bucket_ids.tolist())
    parts = [f"{h}x{w}: {counts[i]}" for i, (h, w) in enumerate(buckets) if counts[i]]
    unreadable = f", {counts[UNREADABLE]} unreadable (left out)" if counts[UNREADABLE] else ""
    return f"aspect-ratio buckets (h x w: images): {', '.join(parts)}{unreadable}"
