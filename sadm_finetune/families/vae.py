"""The VAE a run encodes with and exports: the pipeline's own `vae/` or a separate one
(--pretrained_vae_model_name_or_path, e.g. madebyollin/sdxl-vae-fp16-fix), and the dtype it runs in under mixed
precision.

dtype (`vae_dtype`): under fp16 the VAE stays fp32, as diffusers' SDXL and SD3 scripts keep it ("The VAE is in
float32 to avoid NaN losses": SDXL's VAE overflows in fp16). Under bf16 (no overflow: bf16 has fp32's range) it
follows the family's script: fp32 where that script keeps it fp32 under any mixed precision (SDXL, SD3), the
weight dtype elsewhere (SD 1.x/2.x's train_text_to_image.py casts it to weight_dtype). fp32 runs stay fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config.run import ModelConfig
from ..utils.errors import InputError, first_line


def vae_dtype(weight_dtype: torch.dtype, fp32_under_bf16: bool = False) -> torch.dtype:
    """The dtype the frozen VAE is held in when the other frozen modules are in `weight_dtype`."""
    if weight_dtype == torch.float16 or (weight_dtype == torch.bfloat16 and fp32_under_bf16):
        return torch.float32
    return weight_dtype


def separate_vae_source(config: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(source, `from_pretrained` kwargs) of --pretrained_vae_model_name_or_path: a folder or Hub id holding the VAE's
    config.json (a local pipeline folder's vae/ is found too), at --vae_revision, safetensors unless pickles are
    allowed. Offline, a Hub id loads from the local cache like the pipeline."""
    source = config.pretrained_vae_model_name_or_path
    path = Path(source).expanduser()
    subfolder = None
    if path.is_dir():
        source = str(path)
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            subfolder = "vae"
        elif not (path / "config.json").is_file():
            raise InputError(f"pretrained_vae_model_name_or_path: {source} has no config.json (nor vae/config.json), "
                             "so it is not a diffusers VAE folder; point it at a folder saved with save_pretrained")
    elif path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise InputError(f"pretrained_vae_model_name_or_path: folder {source} not found; pass an existing VAE folder "
                         "or a Hub id like madebyollin/sdxl-vae-fp16-fix")
    return source, {"subfolder": subfolder, "revision": config.vae_revision,
                    "use_safetensors": None if config.allow_pickle_weights else True}


def load_separate_vae(config: ModelConfig, vae_class: type, base: Any = None) -> torch.nn.Module:
    """The separate VAE in fp32, as `vae_class` (the pipeline's VAE class). With `base` (the pipeline's own VAE
    config), one line if it cannot stand in for it: other latent channels or another downsampling factor."""
    source, kwargs = separate_vae_source(config)
    try:
        vae = vae_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        text = first_line(e)
        if "safetensors" in text.lower() and not config.allow_pickle_weights:
            raise InputError(f"pretrained_vae_model_name_or_path: {source} has no safetensors weights ({text}); "
                             "convert them, or pass --allow_pickle_weights if you trust the source") from None
        raise InputError(f"pretrained_vae_model_name_or_path: cannot load {source} ({text})") from None
    except Exception as e:  # corrupt weight files surface as safetensors/torch errors of several types
        raise InputError(f"pretrained_vae_model_name_or_path: weights in {source} could not be read "
                         f"({type(e).__name__}: {first_line(e)}); re-download or re-save the VAE") from None
    if base is not None:
        for key, what in (("latent_channels", "latent channels"), ("block_out_channels", "downsampling stages")):
            mine, theirs = vae.config.get(key), base.get(key)
            if key == "block_out_channels":
                mine, theirs = len(mine), len(theirs)
            if mine != theirs:
                raise InputError(f"pretrained_vae_model_name_or_path: {source} has {mine} {what} and the pipeline's "
                                 f"own VAE {theirs}, so the denoiser cannot read its latents; pass a VAE made for "
                                 "this pipeline (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL)")
    return vae
