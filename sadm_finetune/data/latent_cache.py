"""Latent cache: encode the data set through the VAE once, keep the posteriors on disk, reuse them.

What is stored: the VAE posterior of every image, `mean` and `std` (unscaled, in the VAE's compute
dtype), not a sample, and the geometry of the image it was made from (original size, crop, target
size: `data.SampleGeometry`). Training draws `mean + std * noise` with the step's own generator, exactly
what `latents.encode` draws from the pixels, so caching changes the cost and nothing else: each epoch
still sees a fresh posterior sample (DiT's recipe) rather than one frozen draw, and each sample carries
the same conditioning metadata as on the pixel path.

Flips: a VAE is not flip-equivariant (the latent of a flipped image is not the flipped latent), so
with `random_flip` both orientations are encoded and stored, with the crop as each orientation sees
it; each epoch picks one per sample from the same (seed, epoch, index) generator the pixel path uses.
Random crops are not cached (a cached crop would be the same crop every epoch): `cache_latents`
requires `center_crop` (config check).

Aspect-ratio buckets (`buckets.py`): each image is encoded at its bucket's size, in batches of one
shape; a shard holds one stacked tensor per shape (`mean.<h>x<w>`, and `position.<h>x<w>`: the shard
rows it holds, in order). Without buckets there is one shape, the square resolution.

Key: a hash of the format version, the VAE (config and weights), the encode dtype, resolution,
crop/flip, the bucket list and the data (local files: path, size and mtime of each; otherwise the
`datasets` fingerprint), and with loss masks the mask files the same way: the masks are stored on the
latent grid (`mask.<h>x<w>`, `mask_flipped.<h>x<w>`: area-downsampled, what the pixel path computes). Any
change gives a new folder, so the old entry is never served. Layout:
`<latent_cache_dir>/<key>/shard-NNNNN.safetensors` (SHARD_SIZE samples each, written atomically,
split across processes, reused by an interrupted build) and `manifest.json`, written last. Several
machines need the folder on a shared filesystem. Stale entries are never deleted: remove old folders
by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .buckets import nearest_buckets, read_image_sizes
from ..config.run import DataConfig
from .datasets import GEOMETRY_KEYS, ImageTransform, TrainData, _open_image, load_mask
from ..utils.errors import InputError
from ..diffusion.latents import latent_mask

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: per-row geometry, one tensor per bucket shape
SHARD_SIZE = 1024
_ROW_GEOMETRY = ("original_size", "crop_top_left", "crop_top_left_flipped")  # (n, 2) int64 per shard, row order


def hash_tensors(h: "hashlib._Hash", state: dict[str, torch.Tensor]) -> None:
    """Feed a state dict (names, dtypes, shapes and bytes, in name order) into a hash. A tensor subclass that holds
    its data in inner tensors (torchao's quantized weights: int8 values and their scales) is fed as its class, its
    metadata and those inner tensors."""
    for name in sorted(state):
        tensor = state[name].detach()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
            inner, meta = tensor.__tensor_flatten__()
            h.update(f"{type(tensor).__name__}:{meta!r}".encode())
            hash_tensors(h, {f"{name}.{part}": getattr(tensor, part) for part in inner})
            continue
        h.update(tensor.reshape(-1).view(torch.uint8).cpu().numpy())


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 of the VAE's config and weights: a different or re-trained VAE never hits."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    hash_tensors(h, vae.state_dict())
    return h.hexdigest()


def data_fingerprint(data: TrainData, column: str | None = None) -> str:
    """Local image files of `column` (default the images): their paths, sizes and mtimes, in row order (a row without
    one: "none"); else the `datasets` fingerprint (deterministic for Hub and in-memory sets, and changed by select /
    max_train_samples)."""
    ds, column = data.dataset, column or data.image_column
    first = next((v for batch in ds.select_columns([column]).iter(batch_size=256) for v in batch[column]
                  if v is not None), None)  # a mask column may start with rows without a mask
    if first is not None and (first.get("bytes") is not None or not first.get("path")):
        return f"datasets:{ds._fingerprint}:{column}"
    h = hashlib.sha256()
    for batch in ds.select_columns([column]).iter(batch_size=4096):
        for value in batch[column]:
            if value is None:
                h.update(b"none\n")
                continue
            path = value["path"]
            try:
                st = os.stat(path)
            except OSError:
                h.update(f"{path}:missing\n".encode())
                continue
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "files:" + h.hexdigest()


def cache_key(vae: torch.nn.Module, data: TrainData, resolution: int, random_flip: bool,
              buckets: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "vae": vae_fingerprint(vae),
        "dtype": str(vae.dtype).removeprefix("torch."),
        "resolution": resolution,
        "center_crop": True,
        "random_flip": random_flip,
        "buckets": [list(b) for b in buckets] if buckets else None,
        "data": data_fingerprint(data),
        "num_samples": len(data),
        # Loss masks are cached with the latents (on the latent grid, per orientation): their files are in the key.
        **({"masks": data_fingerprint(data, data.mask_column)} if data.mask_column else {}),
    }


class _PixelRows(torch.utils.data.Dataset):
    """Center-cropped, unflipped pixels of some rows at one target size, with their geometry and a flag for
    unreadable images."""

    def __init__(self, data: TrainData, rows: list[int], target_size: tuple[int, int], on_bad_image: str) -> None:
        self.data, self.rows, self.on_bad_image = data, rows, on_bad_image
        self.target_size = target_size
        self.transform = ImageTransform(max(target_size), center_crop=True, random_flip=False)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.data.dataset[self.rows[i]]
        value = row[self.data.image_column]
        masks = {}
        try:
            pixels, geometry = self.transform(_open_image(value), target_size=self.target_size)
        except (OSError, ValueError, SyntaxError) as e:
            if self.on_bad_image == "error":
                name = value.get("path") or f"row {self.rows[i]}"
                raise InputError(f"train_data_dir: cannot read image {name} ({type(e).__name__}); remove it or "
                                 "pass --on_bad_image skip") from None
            blank = torch.zeros(2, dtype=torch.long)
            if self.data.mask_column:
                masks = {"masks": torch.ones(1, *self.target_size)}
            return {"pixels": torch.zeros(3, *self.target_size), "valid": False,
                    **{name: blank for name in _ROW_GEOMETRY}, **masks}
        if self.data.mask_column:  # the unflipped crop's mask; the flipped one is its mirror image
            masks = {"masks": load_mask(row[self.data.mask_column], geometry)}
        pairs = (geometry.original_size, geometry.crop_top_left, geometry.flip().crop_top_left)
        return {"pixels": pixels, "valid": True, **masks,
                **{name: torch.tensor(pair, dtype=torch.long) for name, pair in zip(_ROW_GEOMETRY, pairs)}}


def _target_sizes(data: TrainData, cfg: DataConfig, resolution: int, rows: range,
                  buckets: list[tuple[int, int]] | None) -> np.ndarray:
    """(len(rows), 2) int64 (h, w) each row is encoded at: its bucket (an unreadable image: the first), or the
    square resolution."""
    if not buckets:
        return np.full((len(rows), 2), resolution, dtype=np.int64)
    ids = nearest_buckets(read_image_sizes(data, cfg.on_bad_image, rows), buckets)
    return np.asarray(buckets, dtype=np.int64)[np.maximum(ids, 0)]


@torch.no_grad()
def _encode_shard(vae, data: TrainData, cfg: DataConfig, rows: range, target_sizes: np.ndarray, batch_size: int,
                  path: Path) -> None:
    """Encode `rows` (batches of one target size each) into one shard file, written atomically."""
    groups: dict[tuple[int, int], list[int]] = {}  # target size -> positions in the shard
    for position, (h, w) in enumerate(target_sizes.tolist()):
        groups.setdefault((h, w), []).append(position)
    per_row = {name: torch.zeros(len(rows), 2, dtype=torch.long) for name in _ROW_GEOMETRY}
    per_row["valid"] = torch.zeros(len(rows), dtype=torch.bool)
    per_row["target_size"] = torch.from_numpy(target_sizes).long()
    tensors: dict[str, torch.Tensor] = {}
    for (h, w), positions in groups.items():
        rows_here = _PixelRows(data, [rows[p] for p in positions], (h, w), cfg.on_bad_image)
        loader = torch.utils.data.DataLoader(rows_here, batch_size=batch_size, num_workers=cfg.dataloader_num_workers,
                                             generator=torch.Generator())  # leaves the global RNG alone (a run
        # that builds the cache must train as one that finds it: the iterator draws its base seed from this one)
        parts: dict[str, list[torch.Tensor]] = {}
        for item in loader:
            pixels = item["pixels"].to(device=vae.device, dtype=vae.dtype)
            views = {"": pixels, "_flipped": pixels.flip(-1)} if cfg.random_flip else {"": pixels}
            for suffix, view in views.items():
                posterior = vae.encode(view).latent_dist
                parts.setdefault("mean" + suffix, []).append(posterior.mean.cpu())
                parts.setdefault("std" + suffix, []).append(posterior.std.cpu())
                if "masks" in item:  # on the latent grid, as latents.latent_loss_mask makes it from the pixels
                    mask = item["masks"].flip(-1) if suffix else item["masks"]
                    parts.setdefault("mask" + suffix, []).append(latent_mask(mask, posterior.mean.shape[-2:]))
            for name in ("valid", *_ROW_GEOMETRY):
                parts.setdefault(name, []).append(item[name])
        index = torch.tensor(positions)
        for name in ("valid", *_ROW_GEOMETRY):
            per_row[name][index] = torch.cat(parts.pop(name))
        tensors.update({f"{name}.{h}x{w}": torch.cat(chunks).contiguous() for name, chunks in parts.items()})
        tensors[f"position.{h}x{w}"] = index
    tensors.update(per_row)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def build_latent_cache(accelerator: Accelerator, vae, data: TrainData, cfg: DataConfig, resolution: int,
                       batch_size: int, buckets: list[tuple[int, int]] | None = None) -> Path:
    """The cache folder for this (VAE, data, transforms, buckets): reused if complete, else encoded (shards
    split across processes) and completed with its manifest. Every process returns the same path."""
    key = cache_key(vae, data, resolution, cfg.random_flip, buckets)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(cfg.latent_cache_dir).expanduser() / digest
    manifest = folder / "manifest.json"
    hit = [manifest.is_file()]
    if accelerator.num_processes > 1:  # one decision for all ranks, even if another run completes it meanwhile
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(hit)
    if hit[0]:
        accelerator.print(f"latent cache: hit {folder}")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    num_shards = math.ceil(len(data) / SHARD_SIZE)
    mine = range(accelerator.process_index, num_shards, accelerator.num_processes)
    todo = [s for s in mine if not (folder / f"shard-{s:05d}.safetensors").is_file()]
    accelerator.print(f"latent cache: encoding {len(data)} images into {folder}")
    for shard in tqdm(todo, desc="encoding latents", disable=not accelerator.is_local_main_process):
        rows = range(shard * SHARD_SIZE, min(len(data), (shard + 1) * SHARD_SIZE))
        targets = _target_sizes(data, cfg, resolution, rows, buckets)
        _encode_shard(vae, data, cfg, rows, targets, batch_size, folder / f"shard-{shard:05d}.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = folder / f".tmp-{os.getpid()}-manifest.json"
        tmp.write_text(json.dumps({**key, "shard_size": SHARD_SIZE, "num_shards": num_shards}, indent=2))
        os.replace(tmp, manifest)
    accelerator.wait_for_everyone()
    return folder


class CachedLatentDataset(torch.utils.data.Dataset):
    """Map-style dataset of {"latent_mean", "latent_std", geometry (GEOMETRY_KEYS), "class_labels"?, "captions"?,
    "latent_masks"?} samples from a cache folder.

    An unreadable image (with on_bad_image=skip) is replaced by the next readable one of the same target size,
    as in `TrainDataset`.
    """

    def __init__(self, data: TrainData, folder: Path, random_flip: bool, seed: int = 0) -> None:
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        self.shard_size = self.manifest["shard_size"]
        self.random_flip, self.seed, self.epoch = random_flip, seed, 0
        self.labels = list(data.dataset[data.label_column]) if data.label_column else None
        self.captions = list(data.dataset[data.caption_column]) if data.caption_column else None
        self.masks = "masks" in self.manifest  # latent loss masks stored beside the latents
        per_row: dict[str, list[torch.Tensor]] = {}
        shapes: list[str] = []  # "<h>x<w>" of each stacked tensor
        shape_of, position_of = [], []  # per row: index into `shapes`, position in that shard's stacked tensor
        for shard in range(self.manifest["num_shards"]):
            with safe_open(str(self._path(shard)), framework="pt") as f:
                for name in ("valid", "target_size", *_ROW_GEOMETRY):
                    per_row.setdefault(name, []).append(f.get_tensor(name))
                rows = len(per_row["valid"][-1])
                shape_here, position_here = torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
                for key in (k for k in f.keys() if k.startswith("position.")):
                    shape = key.removeprefix("position.")
                    if shape not in shapes:
                        shapes.append(shape)
                    positions = f.get_tensor(key)
                    shape_here[positions] = shapes.index(shape)
                    position_here[positions] = torch.arange(len(positions))
                shape_of.append(shape_here)
                position_of.append(position_here)
        self.valid = torch.cat(per_row.pop("valid"))
        if not self.valid.any():
            raise InputError("train_data_dir: no image in the data set could be read; check the files")
        self.target_sizes = torch.cat(per_row.pop("target_size"))  # (N, 2) (h, w): the bucket of each row
        self.geometry = {name: torch.cat(chunks) for name, chunks in per_row.items()}
        self.shapes, self.shape_of, self.position_of = shapes, torch.cat(shape_of), torch.cat(position_of)
        self._handles: dict[int, Any] = {}
        # Caches that mirror this one's shards (terms/repa_cache.FeatureCache): each adds its tensors to a sample,
        # read at the row's (shard, shape, position) in the orientation drawn for it.
        self.companions: list[Any] = []

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # each data-loader worker maps the files itself

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.valid)

    def _path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.safetensors"

    def _shard(self, shard: int) -> Any:
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self._path(shard)), framework="pt")
        return self._handles[shard]

    def _replacement(self, index: int) -> int:
        """The attempt (0: the row itself) that gives a readable row of the same target size (one batch shape)."""
        n, target = len(self), self.target_sizes[index]
        for attempt in range(n):
            row = (index + attempt) % n
            if self.valid[row] and torch.equal(self.target_sizes[row], target):
                return attempt
        raise InputError(f"train_data_dir: no readable image of size {tuple(target.tolist())} in the data set; check "
                         "the files")

    def __getitem__(self, index: int) -> dict[str, Any]:
        # The row and flip choice of `TrainDataset.__getitem__`: seeded by (seed, epoch, index, attempt).
        attempt = self._replacement(index)
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index, attempt)) & (2**63 - 1))
        index = (index + attempt) % len(self)
        flipped = self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        suffix = "_flipped" if flipped else ""
        shape, position = self.shapes[int(self.shape_of[index])], int(self.position_of[index])
        handle = self._shard(index // self.shard_size)
        crop = self.geometry["crop_top_left_flipped" if flipped else "crop_top_left"][index]
        geometry = (self.geometry["original_size"][index], crop, self.target_sizes[index])
        sample: dict[str, Any] = {
            "latent_mean": handle.get_slice(f"mean{suffix}.{shape}")[position:position + 1][0],
            "latent_std": handle.get_slice(f"std{suffix}.{shape}")[position:position + 1][0],
            **dict(zip(GEOMETRY_KEYS, (*(tuple(pair.tolist()) for pair in geometry), flipped))),
        }
        if self.masks:
            sample["latent_masks"] = handle.get_slice(f"mask{suffix}.{shape}")[position:position + 1][0]
        for companion in self.companions:
            sample.update(companion.read(index // self.shard_size, shape, position, flipped))
        if self.labels is not None:
            sample["class_labels"] = int(self.labels[index])
        if self.captions is not None:
            sample["captions"] = self.captions[index]
        return sample
