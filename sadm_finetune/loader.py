"""The training data loader: samples (pixels or cached latents, plus cached text embeddings), batches (shuffled,
or grouped by aspect-ratio bucket) and collate, before `accelerator.prepare`.

Data order on resume: the batch sampler wraps a `RandomSampler`, which `prepare` swaps for accelerate's
seedable sampler (seed + epoch; `use_seedable_sampler` in `training.make_accelerator`); the loop's
`set_epoch` and `skip_first_batches` then replay the interrupted epoch, bucketed or not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from .buckets import (BucketBatchSampler, aspect_ratio_buckets, bucket_ids_of, describe_buckets, nearest_buckets,
                      read_image_sizes)
from .config import RunConfig
from .data import ImageTransform, TrainData, TrainDataset, collate
from .text_cache import TextEmbeddingCache, WithTextEmbeddings


def build_train_dataloader(config: RunConfig, accelerator: Accelerator, adapter: Any, data: TrainData,
                           resolution: int, text_cache: TextEmbeddingCache | None = None
                           ) -> tuple[torch.utils.data.Dataset, torch.utils.data.DataLoader]:
    """The dataset (with `set_epoch`) and its unprepared data loader of `train_batch_size` batches."""
    d, t = config.data, config.training
    seed = t.seed or 0
    buckets = None
    if d.aspect_ratio_buckets:
        buckets = aspect_ratio_buckets(resolution, adapter.aspect_ratio_bucket_multiple())
    if d.cache_latents:
        from .latent_cache import CachedLatentDataset, build_latent_cache

        folder = build_latent_cache(accelerator, adapter.vae, data, d, resolution, t.train_batch_size, buckets)
        dataset = CachedLatentDataset(data, folder, d.random_flip, seed=seed)
        if config.repa.enabled:  # REPA's encoder features, cached beside the latents
            from .terms.repa_cache import feature_cache_for

            dataset.companions.append(feature_cache_for(config, accelerator, adapter, data, folder))
        if buckets:
            bucket_ids = bucket_ids_of(dataset.target_sizes.numpy(), dataset.valid.numpy(), buckets)
    else:
        target_sizes = None
        if buckets:
            sizes = read_image_sizes(data, d.on_bad_image, progress=accelerator.is_local_main_process)
            bucket_ids = nearest_buckets(sizes, buckets)
            target_sizes = np.asarray(buckets, dtype=np.int64)[np.maximum(bucket_ids, 0)]
        transform = ImageTransform(resolution, d.center_crop, d.random_flip)
        dataset = TrainDataset(data, transform, d.on_bad_image, seed=seed, target_sizes=target_sizes)
    if text_cache is not None:
        dataset = WithTextEmbeddings(dataset, text_cache)
    if not buckets:
        return dataset, torch.utils.data.DataLoader(
            dataset, batch_size=t.train_batch_size, shuffle=True, drop_last=True, collate_fn=collate,
            num_workers=d.dataloader_num_workers,
        )
    accelerator.print(describe_buckets(buckets, bucket_ids))
    # One bucket per global batch: runs of num_processes batches, dealt out one per process by accelerate.
    batch_sampler = BucketBatchSampler(torch.utils.data.RandomSampler(dataset), bucket_ids, t.train_batch_size,
                                       group_size=accelerator.num_processes)
    return dataset, torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate,
                                                num_workers=d.dataloader_num_workers)
