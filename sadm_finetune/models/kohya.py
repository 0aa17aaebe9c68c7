"""LoRA files in the kohya / ComfyUI key format (--lora_export_format kohya), for Stable Diffusion 1.x/2.x and SDXL.

Keys: diffusers' `convert_state_dict_to_kohya` of the peft state dict under the `unet.` prefix, i.e.
`lora_unet_<module path, dots as underscores>.lora_down.weight` / `.lora_up.weight` (the UNet's diffusers module
names, which ComfyUI, A1111 and diffusers' own kohya loader map for both families), and one `<module>.alpha` scalar
per module. diffusers writes alpha = rank there; kohya's update scale is alpha / rank, so the run's `lora_alpha`
replaces it. Tensors stay fp32, as trained.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"


def to_kohya(lora_state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft-format UNet LoRA tensors (`...to_q.lora_A.weight`) -> kohya keys, with `.alpha` = `alpha`."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora_state_dict.items()})
    return {k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}


def save_kohya_lora(output_dir: Path, lora_state_dict: dict[str, torch.Tensor], adapter_metadata: dict[str, Any]
                    ) -> Path:
    """Write `KOHYA_WEIGHT_NAME` into `output_dir` atomically (a temporary file, then a rename)."""
    rank, alpha = adapter_metadata["r"], adapter_metadata["lora_alpha"]
    path = Path(output_dir) / KOHYA_WEIGHT_NAME
    tmp = path.with_name(f".tmp-{path.name}")
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha)}  # what kohya's scripts record; UIs show rank and alpha from them
    save_file(to_kohya(lora_state_dict, alpha), str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path
