"""LoRA files in the kohya / ComfyUI key format, for Stable Diffusion 1.x/2.x and SDXL (written by default beside the
diffusers file; --lora_export_format picks).

Keys: diffusers' `convert_state_dict_to_kohya` of the peft state dict under the `unet.` prefix, i.e.
`lora_unet_<module path, dots as underscores>.lora_down.weight` / `.lora_up.weight` (the UNet's diffusers module
names, which ComfyUI, A1111 and diffusers' own kohya loader map for both families), and one `<module>.alpha` scalar
per module. diffusers writes alpha = rank there; kohya's update scale is alpha / rank, so the run's `lora_alpha`
replaces it. Every tensor (alpha too, as kohya's `save_weights` does) is in the LoRA tensors' dtype.

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


def to_kohya(lora_state_dict: dict[str, torch.Tensor], alpha: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """peft-format UNet LoRA tensors (`...to_q.lora_A.weight`) -> kohya keys, with `.alpha` = `alpha` in the tensors'
    dtype: one value, or per peft module name (`...attn1.to_q`: --lora_alpha_pattern; ranks come from the shapes)."""
    from diffusers.utils import convert_state_dict_to_kohya

    dtype = next(iter(lora_state_dict.values())).dtype
    if not isinstance(alpha, dict):
        kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora_state_dict.items()})
        return {k: torch.tensor(float(alpha), dtype=dtype) if k.endswith(".alpha") else v.contiguous()
                for k, v in kohya.items()}
    out: dict[str, torch.Tensor] = {}
    for module, value in alpha.items():  # module by module: each one's .alpha is its own
        part = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora_state_dict.items()
                                            if k.rsplit(".lora_", 1)[0] == module})
        out.update({k: torch.tensor(value, dtype=dtype) if k.endswith(".alpha") else v.contiguous()
                    for k, v in part.items()})
    return out


def kohya_metadata(adapter_metadata: dict[str, Any], labels: dict[str, str]) -> dict[str, str]:
    """The file's metadata: the network's `ss_*` keys from the LoRA config, the ModelSpec version and
    implementation, then `labels` (the base's version and the run's title, resolution, ...), all strings."""
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(adapter_metadata["r"]),
                "ss_network_alpha": str(float(adapter_metadata["lora_alpha"])),
                "ss_network_dropout": str(float(adapter_metadata.get("lora_dropout") or 0.0)),
                "modelspec.sai_model_spec": MODELSPEC_VERSION, "modelspec.implementation": "diffusers"}
    metadata.update({k: str(v) for k, v in labels.items() if v is not None})
    return metadata


def save_kohya_lora(output_dir: Path, lora_state_dict: dict[str, torch.Tensor], adapter_metadata: dict[str, Any],
                    labels: dict[str, str] | None = None) -> Path:
    """Write `KOHYA_WEIGHT_NAME` into `output_dir` atomically (a temporary file, then a rename)."""
    path = Path(output_dir) / KOHYA_WEIGHT_NAME
    tmp = path.with_name(f".tmp-{path.name}")
    alpha = adapter_metadata["lora_alpha"]
    if adapter_metadata.get("alpha_pattern"):
        from .lora import module_alphas

        alpha = module_alphas(adapter_metadata, sorted({k.rsplit(".lora_", 1)[0] for k in lora_state_dict}))
    save_file(to_kohya(lora_state_dict, alpha), str(tmp),
              metadata=kohya_metadata(adapter_metadata, labels or {}))
    os.replace(tmp, path)
    return path
