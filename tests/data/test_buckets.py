"""Aspect-ratio buckets: diffusers' ladder, nearest bucket, header sizes, and batches of one shape."""

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard

from sadm_finetune.data.buckets import (UNREADABLE, BucketBatchSampler, aspect_ratio_buckets, nearest_buckets,
                                   read_image_sizes)
from sadm_finetune.config.run import DataConfig
from sadm_finetune.data.datasets import open_train_data
from sadm_finetune.utils.errors import ConfigError, InputError
from tiny_sd import MIXED_SIZES, build_mixed_aspect_folder


def test_buckets_hold_about_the_square_pixel_count_in_whole_multiples():
    buckets = aspect_ratio_buckets(512, 64)
    assert (512, 512) in buckets and len(set(buckets)) == len(buckets) >= 5
    assert any(h > w for h, w in buckets) and any(h < w for h, w in buckets)
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and 0.7 < h * w / 512**2 < 1.3
    with pytest.raises(ConfigError, match="resolution: 32 is below the bucket side multiple 64"):
        aspect_ratio_buckets(32, 64)


def test_images_go_to_the_bucket_of_nearest_aspect_ratio():
    buckets = aspect_ratio_buckets(512, 64)
    sizes = np.array([(300, 610), (610, 300), (400, 400), (0, 0), (1000, 1333)])
    ids = nearest_buckets(sizes, buckets)
    assert ids[3] == UNREADABLE
    landscape, portrait, square, _, four_three = (buckets[i] for i in ids)
    assert landscape[1] / landscape[0] == pytest.approx(2, rel=0.15) and portrait == landscape[::-1]
    assert square == (512, 512) and four_three[1] / four_three[0] == pytest.approx(4 / 3, rel=0.1)


def test_sizes_come_from_the_headers_and_unreadable_images_are_refused_or_marked(tmp_path):
    root, _ = build_mixed_aspect_folder(tmp_path / "data", copies=1)
    (root / "3.png").write_bytes(b"not a png")
    data = open_train_data(DataConfig(train_data_dir=str(root)))
    with pytest.raises(InputError, match="cannot read image .*3.png.*--on_bad_image skip"):
        read_image_sizes(data, "error")
    sizes = read_image_sizes(data, "skip")
    expected = [MIXED_SIZES[int(v["path"].rsplit("/", 1)[1][:-4])] for v in data.dataset["image"]]
    for got, want, value in zip(sizes.tolist(), expected, data.dataset["image"]):
        assert got == ([0, 0] if value["path"].endswith("/3.png") else list(want))


BUCKET_IDS = [0] * 10 + [1] * 7 + [2] * 3 + [UNREADABLE] * 2


def _batches(sampler):
    return [list(batch) for batch in sampler]


def test_every_batch_is_one_bucket_and_unreadable_images_are_left_out():
    ids = np.array(BUCKET_IDS)
    sampler = BucketBatchSampler(torch.utils.data.RandomSampler(range(len(ids)), generator=torch.manual_seed(0)),
                                 ids, batch_size=3)
    batches = _batches(sampler)
    assert len(batches) == len(sampler) == 10 // 3 + 7 // 3 + 3 // 3
    assert all(len(b) == 3 and len({ids[i] for i in b}) == 1 for b in batches)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) and UNREADABLE not in ids[seen]


def test_processes_get_the_same_bucket_in_each_step():
    ids = np.array(BUCKET_IDS)
    sampler = BucketBatchSampler(torch.utils.data.RandomSampler(range(len(ids)), generator=torch.manual_seed(1)),
                                 ids, batch_size=2, group_size=2)
    assert len(sampler) == (10 // 4 + 7 // 4 + 3 // 4) * 2
    # accelerate's own sharding of a batch sampler, as `prepare` wraps it for two processes (same seeded order)
    ranks = []
    for rank in range(2):
        sampler.sampler.generator.manual_seed(1)
        ranks.append(_batches(BatchSamplerShard(sampler, num_processes=2, process_index=rank)))
    assert len(ranks[0]) == len(ranks[1]) == len(sampler) // 2
    for a, b in zip(*ranks):
        assert len({ids[i] for i in a + b}) == 1 and not set(a) & set(b)


def test_no_bucket_with_a_full_global_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="train_batch_size: no aspect-ratio bucket holds a global batch of 12 images "
                                          r"\(largest bucket: 10\)"):
        BucketBatchSampler(torch.utils.data.RandomSampler(range(22)), BUCKET_IDS, batch_size=6, group_size=2)
