"""The training data loader: samples (pixels or cached latents, plus cached text embeddings), batches (shuffled,
or grouped by aspect-ratio bucket) and collate, before `accelerator.prepare`.

Data order on resume: the batch sampler wraps a `RandomSampler`, which `prepare` swaps for accelerate's
seedable sampler (seed + epoch; `use_seedable_sampler` in `training.make_accelerator`); the loop's
`set_epoch` and `skip_first_batches` then replay the interrupted epoch, bucketed or not. With prior preservation
each sample is an (instance, class) pair and each batch the instances then their classes (prior.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from .buckets import (BucketBatchSampler, aspect_ratio_buckets, bucket_ids_of, describe_buckets, nearest_buckets,
                      read_image_sizes)
from ..config.run import RunConfig
from .datasets import ImageTransform, TrainData, TrainDataset, collate
from .text_cache import TextEmbeddingCache, WithTextEmbeddings


def _dataset(config: RunConfig, accelerator: Accelerator, adapter: Any, data: TrainData, resolution: int,
             buckets: list[tuple[int, int]] | None) -> tuple[torch.utils.data.Dataset, np.ndarray | None]:
    """One data source as a dataset of pixels or cached latents (with the terms' cached companions), and each row's bucket
    id with buckets."""
    d, t = config.data, config.training
    seed = t.seed or 0
    bucket_ids = None
    if d.cache_latents:
        from .latent_cache import CachedLatentDataset, build_latent_cache

        folder = build_latent_cache(accelerator, adapter.vae, data, d, resolution, t.train_batch_size, buckets)
        dataset = CachedLatentDataset(data, folder, d.random_flip, seed=seed)
        for section in config.term_sections.values():  # what a term reads beside the latents (REPA's features)
            if section.enabled:
                dataset.companions.extend(section.cache_companions(config, accelerator, adapter, data, folder))
        if buckets:
            bucket_ids = bucket_ids_of(dataset.target_sizes.numpy(), dataset.valid.numpy(), buckets)
        return dataset, bucket_ids
    target_sizes = None
    if buckets:
        sizes = read_image_sizes(data, d.on_bad_image, progress=accelerator.is_local_main_process)
        bucket_ids = nearest_buckets(sizes, buckets)
        target_sizes = np.asarray(buckets, dtype=np.int64)[np.maximum(bucket_ids, 0)]
    transform = ImageTransform(resolution, d.center_crop, d.random_flip)
    return TrainDataset(data, transform, d.on_bad_image, seed=seed, target_sizes=target_sizes), bucket_ids


def build_train_dataloader(config: RunConfig, accelerator: Accelerator, adapter: Any, data: TrainData,
                           resolution: int, text_cache: TextEmbeddingCache | None = None,
                           class_data: TrainData | None = None
                           ) -> tuple[torch.utils.data.Dataset, torch.utils.data.DataLoader]:
    """The dataset (with `set_epoch`) and its unprepared data loader of `train_batch_size` batches. `class_data`:
    prior preservation's class images, paired with the instances (prior.py; no buckets)."""
    d, t = config.data, config.training
    buckets = None
    if d.aspect_ratio_buckets:
        buckets = aspect_ratio_buckets(resolution, adapter.aspect_ratio_bucket_multiple())
    dataset, bucket_ids = _dataset(config, accelerator, adapter, data, resolution, buckets)
    if text_cache is not None:
        dataset = WithTextEmbeddings(dataset, text_cache)
    collate_fn = collate
    if class_data is not None:
        from .prior import PriorPreservationCollate, PriorPreservationDataset

        classes, _ = _dataset(config, accelerator, adapter, class_data, resolution, None)
        if text_cache is not None:
            classes = WithTextEmbeddings(classes, text_cache)
        dataset = PriorPreservationDataset(dataset, classes)
        collate_fn = PriorPreservationCollate(config.dreambooth.prior_loss_weight)
    if not buckets:
        return dataset, torch.utils.data.DataLoader(
            dataset, batch_size=t.train_batch_size, shuffle=True, drop_last=True, collate_fn=collate_fn,
            num_workers=d.dataloader_num_workers,
        )
    accelerator.print(describe_buckets(buckets, bucket_ids))
    # One bucket per global batch: runs of num_processes batches, dealt out one per process by accelerate.
    batch_sampler = BucketBatchSampler(torch.utils.data.RandomSampler(dataset), bucket_ids, t.train_batch_size,
                                       group_size=accelerator.num_processes)
    return dataset, torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn,
                                                num_workers=d.dataloader_num_workers)
