"""Latent cache: encode the data set through the VAE once, keep the posteriors on disk, reuse them.

What is stored: the VAE posterior of every image, `mean` and `std` (unscaled, in the VAE's compute
dtype), not a sample. Training draws `mean + std * noise` with the step's own generator, exactly what
`latents.encode` draws from the pixels, so caching changes the cost and nothing else: each epoch
still sees a fresh posterior sample (DiT's recipe) rather than one frozen draw.

Flips: a VAE is not flip-equivariant (the latent of a flipped image is not the flipped latent), so
with `random_flip` both orientations are encoded and stored; each epoch picks one per sample from
the same (seed, epoch, index) generator the pixel path uses. Random crops are not cached (a cached
crop would be the same crop every epoch): `cache_latents` requires `center_crop` (config check).

Key: a hash of the format version, the VAE (config and weights), the encode dtype, resolution,
crop/flip and the data (local files: path, size and mtime of each; otherwise the `datasets`
fingerprint). Any change gives a new folder, so the old entry is never served. Layout:
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

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import DataConfig
from .data import ImageTransform, TrainData, _open_image
from .errors import InputError

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
SHARD_SIZE = 1024


def _hash_tensors(h: "hashlib._Hash", state: dict[str, torch.Tensor]) -> None:
    for name in sorted(state):
        tensor = state[name].detach()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).cpu().numpy().tobytes())


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 of the VAE's config and weights: a different or re-trained VAE never hits."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    _hash_tensors(h, vae.state_dict())
    return h.hexdigest()


def data_fingerprint(data: TrainData) -> str:
    """Local image files: their paths, sizes and mtimes, in row order; else the `datasets` fingerprint
    (deterministic for Hub and in-memory sets, and changed by select / max_train_samples)."""
    ds = data.dataset
    first = ds[0][data.image_column]
    if first.get("bytes") is not None or not first.get("path"):
        return f"datasets:{ds._fingerprint}"
    h = hashlib.sha256()
    for batch in ds.select_columns([data.image_column]).iter(batch_size=4096):
        for value in batch[data.image_column]:
            path = value["path"]
            try:
                st = os.stat(path)
            except OSError:
                h.update(f"{path}:missing\n".encode())
                continue
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "files:" + h.hexdigest()


def cache_key(vae: torch.nn.Module, data: TrainData, resolution: int, random_flip: bool) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "vae": vae_fingerprint(vae),
        "dtype": str(vae.dtype).removeprefix("torch."),
        "resolution": resolution,
        "center_crop": True,
        "random_flip": random_flip,
        "data": data_fingerprint(data),
        "num_samples": len(data),
    }


class _PixelRows(torch.utils.data.Dataset):
    """Center-cropped, unflipped pixels of each row, with a flag for unreadable images."""

    def __init__(self, data: TrainData, resolution: int, rows: range, on_bad_image: str) -> None:
        self.data, self.rows, self.on_bad_image = data, rows, on_bad_image
        self.transform = ImageTransform(resolution, center_crop=True, random_flip=False)
        self.blank = torch.zeros(3, resolution, resolution)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        value = self.data.dataset[self.rows[i]][self.data.image_column]
        try:
            return self.transform(_open_image(value)), True
        except (OSError, ValueError, SyntaxError) as e:
            if self.on_bad_image == "error":
                name = value.get("path") or f"row {self.rows[i]}"
                raise InputError(f"train_data_dir: cannot read image {name} ({type(e).__name__}); remove it or "
                                 "pass --on_bad_image skip") from None
            return self.blank, False


@torch.no_grad()
def _encode_shard(vae, data: TrainData, cfg: DataConfig, resolution: int, rows: range, batch_size: int,
                  path: Path) -> None:
    loader = torch.utils.data.DataLoader(_PixelRows(data, resolution, rows, cfg.on_bad_image), batch_size=batch_size,
                                         num_workers=cfg.dataloader_num_workers)
    parts: dict[str, list[torch.Tensor]] = {}
    for pixels, valid in loader:
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        views = {"": pixels, "_flipped": pixels.flip(-1)} if cfg.random_flip else {"": pixels}
        for suffix, view in views.items():
            posterior = vae.encode(view).latent_dist
            parts.setdefault("mean" + suffix, []).append(posterior.mean.cpu())
            parts.setdefault("std" + suffix, []).append(posterior.std.cpu())
        parts.setdefault("valid", []).append(valid)
    tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def build_latent_cache(accelerator: Accelerator, vae, data: TrainData, cfg: DataConfig, resolution: int,
                       batch_size: int) -> Path:
    """The cache folder for this (VAE, data, transforms): reused if complete, else encoded (shards split
    across processes) and completed with its manifest. Every process returns the same path."""
    key = cache_key(vae, data, resolution, cfg.random_flip)
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
        _encode_shard(vae, data, cfg, resolution, rows, batch_size, folder / f"shard-{shard:05d}.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = folder / f".tmp-{os.getpid()}-manifest.json"
        tmp.write_text(json.dumps({**key, "shard_size": SHARD_SIZE, "num_shards": num_shards}, indent=2))
        os.replace(tmp, manifest)
    accelerator.wait_for_everyone()
    return folder


class CachedLatentDataset(torch.utils.data.Dataset):
    """Map-style dataset of {"latent_mean", "latent_std", "class_labels"?, "captions"?} from a cache folder.

    An unreadable image (with on_bad_image=skip) is replaced by the next readable one, as in `TrainDataset`.
    """

    def __init__(self, data: TrainData, folder: Path, random_flip: bool, seed: int = 0) -> None:
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        self.shard_size = self.manifest["shard_size"]
        self.random_flip, self.seed, self.epoch = random_flip, seed, 0
        self.labels = list(data.dataset[data.label_column]) if data.label_column else None
        self.captions = list(data.dataset[data.caption_column]) if data.caption_column else None
        valid = []
        for shard in range(self.manifest["num_shards"]):
            with safe_open(str(self._path(shard)), framework="pt") as f:
                valid.append(f.get_tensor("valid"))
        self.valid = torch.cat(valid)
        if not self.valid.any():
            raise InputError("train_data_dir: no image in the data set could be read; check the files")
        self._handles: dict[int, Any] = {}

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

    def __getitem__(self, index: int) -> dict[str, Any]:
        # The row and flip choice of `TrainDataset.__getitem__`: seeded by (seed, epoch, index, attempt).
        attempt = next(a for a in range(len(self)) if self.valid[(index + a) % len(self)])
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index, attempt)) & (2**63 - 1))
        index = (index + attempt) % len(self)
        flipped = self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        suffix = "_flipped" if flipped else ""
        shard, row = divmod(index, self.shard_size)
        handle = self._shard(shard)
        sample: dict[str, Any] = {
            "latent_mean": handle.get_slice("mean" + suffix)[row:row + 1][0],
            "latent_std": handle.get_slice("std" + suffix)[row:row + 1][0],
        }
        if self.labels is not None:
            sample["class_labels"] = int(self.labels[index])
        if self.captions is not None:
            sample["captions"] = self.captions[index]
        return sample
