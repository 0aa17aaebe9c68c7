"""Outputs of a run: the stock pipeline folder (written atomically), sample grids, model card, push."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .config import RunConfig
from .fsutil import move_into_place

PUSH_IGNORE = ["checkpoints/*", "checkpoints/**", ".tmp-*", ".tmp-*/**"]


def save_pipeline_atomically(pipeline: Any, output_dir: Path, extra: dict[str, Any] | None = None) -> None:
    """`save_pretrained` into a temporary sibling folder, then move each entry into `output_dir`.

    `model_index.json` moves last, so a reader sees either the previous complete pipeline or the new
    one, never a half-written folder. `extra` maps folder names to models saved beside it.
    """
    tmp = output_dir / ".tmp-export"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    for name, model in (extra or {}).items():
        model.save_pretrained(tmp / name, safe_serialization=True)
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json")
    for entry in entries:
        move_into_place(entry, output_dir / entry.name)
    shutil.rmtree(tmp)


def save_grid(images: np.ndarray, path: Path) -> Path:
    """(rows, cols, H, W, 3) floats in [0, 1] -> one PNG, written atomically."""
    rows, cols, h, w, _ = images.shape
    grid = images.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def reproduce_command(argv: list[str] | None = None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["accelerate", "launch", "train_sadm.py", *args])


def write_model_card(
    output_dir: Path, config: RunConfig, family_tags: list[str], data_description: str,
    summary: dict[str, Any], argv: list[str] | None = None, lora_usage: str | None = None,
) -> Path:
    """The README: `lora_usage` (code that applies the LoRA file to the base model) marks a LoRA run."""
    from huggingface_hub import ModelCard, ModelCardData

    base = config.model.pretrained_model_name_or_path
    card_data = ModelCardData(
        library_name="diffusers",
        base_model=base if not Path(base).exists() else None,
        tags=["sadm", "diffusers", *family_tags, "structure-guided-adversarial-training",
              *(["lora"] if lora_usage else [])],
        license=None,
    )
    sadm_rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in vars(config.sadm).items())
    stats = "\n".join(f"- {k}: {v}" for k, v in summary.items())
    ema_note = (
        f"The exported weights are the exponential moving average (decay {config.training.ema_decay}) of the trained "
        "weights." if config.training.use_ema else "The exported weights are the final trained weights (no EMA)."
    )
    repo = config.training.hub_model_id or output_dir.name
    lora_section = "" if lora_usage is None else f"""
## LoRA

Trained as a LoRA (rank {config.model.lora_rank}, alpha {config.model.lora_alpha or config.model.lora_rank}) on the
base model's denoiser. This folder holds the result twice, for two uses:

- the full pipeline (`model_index.json` and the component folders), with the LoRA already merged into the
  weights: load it with `DiffusionPipeline.from_pretrained` as above, and do not apply the LoRA file to it
  again (that would add the update twice);
- `pytorch_lora_weights.safetensors`, the LoRA alone (diffusers format, its configuration in the file's
  metadata), to apply to the base model `{base}`:

```python
{lora_usage}
```
"""
    mode = "structure loss off (plain fine-tune baseline)" if not config.sadm.enabled else (
        f"structure weight lambda = {config.sadm.structure_weight}")
    content = f"""---
{card_data.to_yaml()}
---

# {output_dir.name}

Fine-tuned from `{base}` with sadm-finetune using SADM, structure-guided adversarial
training (Yang et al., CVPR 2024, arXiv:2402.17563): besides the denoising loss, a structure discriminator
compares the pairwise relations of real and predicted clean latents in each batch; {mode}.

- Data: {data_description}
{stats}

{ema_note}

## Use

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo}")
```

![samples](samples/final.png)
{lora_section}
## SADM settings

| option | value |
|---|---|
{sadm_rows}

## Reproduce

```bash
{reproduce_command(argv)}
# or, with the resolved configuration saved beside the weights:
accelerate launch train_sadm.py --config training_config.yaml
```
"""
    card = ModelCard(content)
    path = output_dir / "README.md"
    tmp = output_dir / ".tmp-README.md"
    card.save(tmp)
    os.replace(tmp, path)
    return path


def push_to_hub(output_dir: Path, repo_id: str, private: bool = False) -> str:
    """Upload the output folder (not the checkpoints). The token comes from HF_TOKEN or the cached login."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
    commit = api.upload_folder(
        folder_path=str(output_dir), repo_id=repo_id, repo_type="model", ignore_patterns=PUSH_IGNORE,
        commit_message="Upload SADM fine-tuned pipeline",
    )
    return getattr(commit, "commit_url", str(commit))
