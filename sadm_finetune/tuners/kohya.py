"""LoRA files in the kohya / ComfyUI key format, for Stable Diffusion 1.x/2.x and SDXL (written by default beside the
diffusers file; --lora_export_format picks).

Keys: diffusers' `convert_state_dict_to_kohya` of the peft state dict under the `unet.` prefix, i.e.
`lora_unet_<module path, dots as underscores>.lora_down.weight` / `.lora_up.weight` (the UNet's diffusers module
names, which ComfyUI, A1111 and diffusers' own kohya loader map for both families), and one `<module>.alpha` scalar
per module. diffusers writes alpha = rank there; kohya's update scale is alpha / rank, so the run's `lora_alpha`
replaces it (with --lora_alpha_pattern, folded into the weights: `fold_alpha_pattern`). Every tensor (alpha too,
as kohya's `save_weights` does) is in the LoRA tensors' dtype. A text-encoder LoRA (--train_text_encoder) joins
the same file under sd-scripts' own names, `lora_te_text_model_encoder_layers_<i>_self_attn_q_proj` (SD) or
`lora_te1_...` / `lora_te2_...` (SDXL's two encoders), with its own `.alpha`.

Metadata: what kohya's sd-scripts write (train_network.py's `ss_*` keys, library/sai_model_spec.py's `modelspec.*`
keys): the network (`ss_network_module`, `ss_network_dim`, `ss_network_alpha`), the base's version
(`ss_base_model_version`, `ss_v2`, `modelspec.architecture`: the family adapter's `kohya_labels`), which A1111 and
Forge read to list the LoRA under SD 1.x, 2.x or SDXL, and the run's labels (title, resolution, ...).
`modelspec.implementation` is `diffusers`: the keys name diffusers' UNet modules (kohya's own SDXL files use the
original SGM names and say so with the generative-models URL).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
MODELSPEC_VERSION = "1.0.1"  # sai_model_spec.BASE_METADATA["modelspec.sai_model_spec"] in kohya's sd-scripts


def to_kohya(lora_state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft-format UNet LoRA tensors (`...to_q.lora_A.weight`) -> kohya keys, with `.alpha` = `alpha` in the tensors'
    dtype."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora_state_dict.items()})
    dtype = next(iter(lora_state_dict.values())).dtype
    return {k: torch.tensor(float(alpha), dtype=dtype) if k.endswith(".alpha") else v.contiguous()
            for k, v in kohya.items()}


def text_encoder_to_kohya(lora_state_dict: dict[str, torch.Tensor], prefix: str, alpha: float
                          ) -> dict[str, torch.Tensor]:
    """A text encoder's peft LoRA tensors (`text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`) -> kohya's
    keys as sd-scripts' networks/lora.py names them: `<prefix>_<module path, dots as underscores>` with prefix
    `lora_te` (SD's one encoder) or `lora_te1` / `lora_te2` (SDXL's two), `.lora_down.weight` (lora_A),
    `.lora_up.weight` (lora_B) and one `.alpha` per module, in the tensors' dtype."""
    out: dict[str, torch.Tensor] = {}
    dtype = next(iter(lora_state_dict.values())).dtype
    for key, value in lora_state_dict.items():
        module, _, part = key.rpartition(".lora_")
        name = f"{prefix}_{module.replace('.', '_')}"
        out[f"{name}.{'lora_down' if part == 'A.weight' else 'lora_up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def fold_alpha_pattern(lora_state_dict: dict[str, torch.Tensor], adapter_metadata: dict[str, Any]
                       ) -> dict[str, torch.Tensor]:
    """With --lora_alpha_pattern: each module whose alpha differs from `lora_alpha` gets its `lora_B` (kohya's
    `lora_up`) scaled by its alpha / lora_alpha, so that one `.alpha` (lora_alpha) gives every module its own scale.
    Per-module `.alpha` values are kohya's format, but diffusers 0.42's kohya reader maps them onto no module and
    applies one alpha to all; folded, every reader (ComfyUI, A1111, kohya's scripts, diffusers) computes the same.
    Ranks need nothing: every reader takes them from the shapes."""
    if not adapter_metadata.get("alpha_pattern"):
        return lora_state_dict
    from .lora import module_alphas

    alpha = float(adapter_metadata["lora_alpha"])
    alphas = module_alphas(adapter_metadata, sorted({k.rsplit(".lora_", 1)[0] for k in lora_state_dict}))
    out = dict(lora_state_dict)
    for module, value in alphas.items():
        key = f"{module}.lora_B.weight"
        if value != alpha:
            out[key] = (out[key].float() * (value / alpha)).to(out[key].dtype)
    return out


def kohya_metadata(adapter_metadata: dict[str, Any], labels: dict[str, str], text_encoders: bool = False
                   ) -> dict[str, str]:
    """The file's metadata: the network's `ss_*` keys from the LoRA config, the ModelSpec version and
    implementation, then `labels` (the base's version and the run's title, resolution, ...), all strings. With
    `text_encoders` (a text-encoder LoRA in the file), kohya's `ss_network_train_unet_only` says so."""
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(adapter_metadata["r"]),
                "ss_network_alpha": str(float(adapter_metadata["lora_alpha"])),
                "ss_network_dropout": str(float(adapter_metadata.get("lora_dropout") or 0.0)),
                "modelspec.sai_model_spec": MODELSPEC_VERSION, "modelspec.implementation": "diffusers"}
    if text_encoders:
        metadata["ss_network_train_unet_only"] = "False"
    metadata.update({k: str(v) for k, v in labels.items() if v is not None})
    return metadata


def save_kohya_lora(output_dir: Path, lora_state_dict: dict[str, torch.Tensor], adapter_metadata: dict[str, Any],
                    labels: dict[str, str] | None = None,
                    text_encoders: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None) -> Path:
    """Write `KOHYA_WEIGHT_NAME` into `output_dir` atomically (a temporary file, then a rename). `text_encoders`:
    kohya prefix (`lora_te`, `lora_te1`, `lora_te2`) -> (that encoder's LoRA tensors under `text_model.`, its LoRA
    config), written in the same file (`text_encoder_to_kohya`)."""
    path = Path(output_dir) / KOHYA_WEIGHT_NAME
    tmp = path.with_name(f".tmp-{path.name}")
    tensors = to_kohya(fold_alpha_pattern(lora_state_dict, adapter_metadata), adapter_metadata["lora_alpha"])
    for prefix, (state, metadata) in (text_encoders or {}).items():
        tensors.update(text_encoder_to_kohya(state, prefix, metadata["lora_alpha"]))
    save_file(tensors, str(tmp),
              metadata=kohya_metadata(adapter_metadata, labels or {}, bool(text_encoders)))
    os.replace(tmp, path)
    return path
