"""REPA's encoder features cached beside the latents (--cache_latents): the batch then has no pixels.

Layout: `<latent cache folder>/repa-<key>/shard-NNNNN.safetensors` and `manifest.json` (written last).
Each feature shard mirrors the latent shard of the same number: the same rows, grouped by the same target
sizes in the same order (`features.<h>x<w>`: (n, E, gh, gw), in the encoder's dtype), so the row's shard,
shape and position in the latent cache address its features too. With `random_flip` both orientations
are encoded (`features_flipped.<h>x<w>`), exactly as the latent cache stores both: an encoder is not
flip-equivariant either, and the flip the cached-latent dataset draws picks the matching features.

Key: the format, the encoder (config, weights, dtype, resolution, normalisation) and the latent cache's
own key (the folder it sits in, whose name is that key's digest, and its manifest). The encoder is loaded
only to build or fingerprint the cache and freed after; training reads features from disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ...config.run import DataConfig
from ...data.datasets import TrainData
from ...data.latent_cache import _PixelRows, hash_tensors
from .term import FEATURES_KEY, VisionEncoder

FEATURE_CACHE_FORMAT = 1


def encoder_fingerprint(encoder: VisionEncoder) -> str:
    """sha256 of what decides the features: the encoder's config and weights, dtype, input size, normalisation."""
    model = encoder.model
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    h.update(json.dumps({"dtype": str(encoder.dtype), "resolution": encoder.resolution,
                         "mean": encoder.mean.flatten().tolist(), "std": encoder.std.flatten().tolist()}).encode())
    hash_tensors(h, model.state_dict())
    return h.hexdigest()


def feature_cache_key(encoder: VisionEncoder, latent_folder: Path) -> dict[str, Any]:
    latent_manifest = json.loads((latent_folder / "manifest.json").read_text())
    return {"format": FEATURE_CACHE_FORMAT, "encoder": encoder_fingerprint(encoder),
            "latent_cache": latent_folder.name, "latent_manifest": latent_manifest}


@torch.no_grad()
def _encode_shard(encoder: VisionEncoder, data: TrainData, cfg: DataConfig, latent_shard: Path, first_row: int,
                  batch_size: int, path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(latent_shard), framework="pt") as f:
        groups = {key.removeprefix("position."): f.get_tensor(key) for key in f.keys() if key.startswith("position.")}
    for shape, positions in groups.items():
        h, w = (int(side) for side in shape.split("x"))
        rows = _PixelRows(data, [first_row + int(p) for p in positions], (h, w), cfg.on_bad_image)
        loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, num_workers=cfg.dataloader_num_workers,
                                             generator=torch.Generator())  # leaves the global RNG alone (a run
        # that builds the cache must train as one that finds it: the iterator draws its base seed from this one)
        parts: dict[str, list[torch.Tensor]] = {}
        for item in loader:
            pixels = item["pixels"]
            views = {"": pixels, "_flipped": pixels.flip(-1)} if cfg.random_flip else {"": pixels}
            for suffix, view in views.items():
                parts.setdefault(f"features{suffix}", []).append(encoder(view).cpu())
        tensors.update({f"{name}.{shape}": torch.cat(chunks).contiguous() for name, chunks in parts.items()})
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def build_feature_cache(accelerator: Accelerator, encoder: VisionEncoder, data: TrainData, cfg: DataConfig,
                        latent_folder: Path, batch_size: int) -> Path:
    """The feature folder for this (encoder, latent cache): reused if complete, else encoded (shards split across
    processes, an interrupted build's shards reused). Every process returns the same path."""
    key = feature_cache_key(encoder, latent_folder)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = latent_folder / f"repa-{digest}"
    manifest = folder / "manifest.json"
    hit = [manifest.is_file()]
    if accelerator.num_processes > 1:  # one decision for all ranks
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(hit)
    if hit[0]:
        accelerator.print(f"REPA feature cache: hit {folder}")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    num_shards, shard_size = key["latent_manifest"]["num_shards"], key["latent_manifest"]["shard_size"]
    mine = range(accelerator.process_index, num_shards, accelerator.num_processes)
    todo = [s for s in mine if not (folder / f"shard-{s:05d}.safetensors").is_file()]
    accelerator.print(f"REPA feature cache: encoding {len(data)} images into {folder}")
    for shard in tqdm(todo, desc="encoding REPA features", disable=not accelerator.is_local_main_process):
        name = f"shard-{shard:05d}.safetensors"
        _encode_shard(encoder, data, cfg, latent_folder / name, shard * shard_size, batch_size, folder / name)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = folder / f".tmp-{os.getpid()}-manifest.json"
        tmp.write_text(json.dumps({**key, "num_shards": num_shards}, indent=2))
        os.replace(tmp, manifest)
    accelerator.wait_for_everyone()
    return folder


class FeatureCache:
    """Reads one row's features for `latent_cache.CachedLatentDataset` (one of its `companions`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._handles: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # each data-loader worker maps the files itself

    def read(self, shard: int, shape: str, position: int, flipped: bool) -> dict[str, torch.Tensor]:
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / f"shard-{shard:05d}.safetensors"), framework="pt")
        name = f"features{'_flipped' if flipped else ''}.{shape}"
        return {FEATURES_KEY: self._handles[shard].get_slice(name)[position:position + 1][0]}


def feature_cache_for(config, accelerator: Accelerator, adapter, data: TrainData, latent_folder: Path) -> FeatureCache:
    """Load the encoder (on the device, in the frozen modules' dtype), build or find its cache, free it."""
    r, vae = config.repa, adapter.vae
    encoder = VisionEncoder.from_pretrained(r.repa_encoder, r.repa_encoder_resolution, vae.device, vae.dtype)
    folder = build_feature_cache(accelerator, encoder, data, config.data, latent_folder,
                                 config.training.train_batch_size)
    del encoder
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return FeatureCache(folder)

