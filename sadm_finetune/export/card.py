"""The model card (README.md) of a run's output folder: what the Hub shows and what a user copies.

- YAML: `base_model` (a Hub base; a local path never), the base's licence (`license`, and `license_name` /
  `license_link` for `other`, read from the base's own card in its folder or the Hugging Face cache:
  `inherited_license`), the tags diffusers' training scripts and the Hub's LoRA pages use (`diffusers-training`;
  `lora` and `template:sd-lora` for LoRA runs; the family's), a `widget` gallery of the final samples (one image per
  validation prompt or class) and, when the data names one, the `instance_prompt` (`trigger_words`).
- Body: which file is for which tool, usage code that runs as written (the Hub id when pushed, or the folder's name,
  and a `pipe(...)` call that makes an image), the loss terms' settings tables (`TermConfig.card_table`), and the
  command that reproduces the run from the repository root (`accelerate launch -q ... train_sadm.py --config
  <recipe as given, relative to the root>`).

Local paths are written by their last component only (`export.public_name`), on disk too: the card is what goes up.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.run import ModelConfig, RunConfig
from .outputs import is_local_path, local_paths, public_name, scrub

REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder of train_sadm.py and configs/
LORA_TAGS = ["lora", "template:sd-lora"]  # the Hub's LoRA pages (gallery widget, trigger words) key on these


@dataclass
class CardFacts:
    """What the card says besides the config, gathered by `finish.export_run`."""

    family_tags: list[str]
    data_description: str
    summary: dict[str, Any]
    usages: list[tuple[str, str]]  # (heading, code): loading the output and making an image; the first is the main one
    lora_files: dict[str, str] = field(default_factory=dict)  # format ("diffusers", "kohya") -> file name
    pipeline: bool = True  # whether the folder holds the full pipeline (model_index.json and the components)
    stock_lora_loader: bool = False  # whether the pipeline's own load_lora_weights reads the diffusers LoRA file
    widget: list[tuple[str, str]] = field(default_factory=list)  # (caption, image path relative to the folder)
    prompts: list[str] = field(default_factory=list)  # the validation prompts of a text family
    num_processes: int = 1
    mixed_precision: str = "no"
    argv: list[str] | None = None  # the run's command-line arguments (default: sys.argv[1:])


def trigger_words(config: RunConfig) -> str | None:
    """The data's instance prompt / trigger words, for the card's `instance_prompt` and the kohya file's
    `modelspec.trigger_phrase`: --instance_prompt with its --caption_prefix, else the prefix alone; None without
    either (the card then lists the validation prompts the samples were made with)."""
    from ..data.folder import instance_caption

    return instance_caption(config.data) or config.data.caption_prefix or None


def _prior_line(config: RunConfig) -> str:
    """The card's line on DreamBooth's prior preservation, when the run used it."""
    p = config.dreambooth
    if not p.with_prior_preservation:
        return ""
    return (f"\n- Prior preservation (DreamBooth): {p.num_class_images} class images of `{p.class_prompt}` in every "
            f"batch beside the instance images, prior loss weight {p.prior_loss_weight}")


def inherited_license(model: ModelConfig) -> dict[str, str]:
    """The base's licence as its own card states it (`license`, `license_name`, `license_link`), read from the base
    folder or its snapshot in the local Hugging Face cache (never downloaded); {} when that card is not here or names
    none. A relative `license_link` becomes the base repo's file URL (Hub base) or is dropped (local base)."""
    from huggingface_hub.repocard import metadata_load

    from ..families.loading import base_folder

    folder = base_folder(model)
    readme = folder / "README.md" if folder is not None else None
    if readme is None or not readme.is_file():
        return {}
    try:
        meta = metadata_load(readme) or {}
    except Exception:  # a card without valid YAML: no licence to inherit
        return {}
    found = {k: str(meta[k]) for k in ("license", "license_name", "license_link") if isinstance(meta.get(k), str)}
    link = found.get("license_link")
    if link and "://" not in link:
        source = model.pretrained_model_name_or_path
        if is_local_path(source):
            del found["license_link"]
        else:
            found["license_link"] = f"https://huggingface.co/{source}/blob/{model.revision or 'main'}/{link}"
    return found


def repo_relative(value: str) -> str:
    """A path inside the repository as a path relative to its root (a recipe: `configs/sd15-lora.yaml`); any other
    local path by its last component; anything else as it is."""
    if not is_local_path(value):
        return value
    path = Path(value).expanduser().resolve()
    if path.is_relative_to(REPO_ROOT) and path != REPO_ROOT:
        return path.relative_to(REPO_ROOT).as_posix()
    return public_name(value)


def launch_prefix(num_processes: int, mixed_precision: str) -> list[str]:
    """`accelerate launch -q` with every value accelerate otherwise fills in with a warning."""
    return ["accelerate", "launch", "-q", *(["--multi_gpu"] if num_processes > 1 else []), "--num_processes",
            str(num_processes), "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]


def reproduce_command(argv: list[str] | None = None, num_processes: int = 1, mixed_precision: str = "no") -> str:
    """The run's command, runnable from the repository root: recipe paths relative to it."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join([*launch_prefix(num_processes, mixed_precision), "train_sadm.py", *map(repo_relative, args)])


def _files_section(output_dir: Path, config: RunConfig, facts: CardFacts, repo: str, base: str) -> str:
    from ..tuners.kohya import KOHYA_WEIGHT_NAME
    from ..tuners.lora import LORA_WEIGHT_NAME

    lines = []
    if facts.pipeline:
        merged = " with the LoRA merged into its weights (do not apply the LoRA file to it again)" \
            if config.model.use_lora else ""
        if config.model.use_lora and not facts.lora_files:  # LoHa / LoKr: no stock loader, so no adapter file
            merged = f" with the {config.model.lora_type} adapter merged into its weights"
        lines.append(f"- `model_index.json` and the component folders: the full pipeline{merged}; "
                     f"`DiffusionPipeline.from_pretrained(\"{repo}\")` loads it.")
    if "diffusers" in facts.lora_files:
        loader = "with `pipe.load_lora_weights`" if facts.stock_lora_loader else \
            "through diffusers' `PeftAdapterMixin` on its denoiser (diffusers has no LoRA loader for this pipeline)"
        text = " (the denoiser's and the text encoders' LoRA, which the loader applies to both)" \
            if config.model.train_text_encoder else ""
        lines.append(f"- `{LORA_WEIGHT_NAME}`: the LoRA for **diffusers**{text} (peft keys, its configuration in the "
                     f"file's metadata), applied to the base `{base}` {loader} as below.")
    if "kohya" in facts.lora_files:
        te_keys = ", the text encoders' under `lora_te...`" if config.model.train_text_encoder else ""
        lines.append(f"- `{KOHYA_WEIGHT_NAME}`: the same LoRA for **ComfyUI** (copy it to `models/loras/`, load it "
                     "with a LoraLoader node), **AUTOMATIC1111 / Forge** (`models/Lora/`, then "
                     "`<lora:pytorch_lora_weights_kohya:1>` in the prompt) and **kohya's scripts**: kohya key format (`lora_unet_...lora_down/"
                     f"lora_up.weight`, `.alpha`{te_keys}) and metadata (`ss_base_model_version`, `modelspec.architecture`); "
                     f"diffusers reads it too: `pipe.load_lora_weights(\"{repo}\", "
                     f"weight_name=\"{KOHYA_WEIGHT_NAME}\")`.")
    saved = "".join(f"`{folder}/` ({what}), " for section in config.term_sections.values()  # the terms' modules
                    for folder, what in section.card_files().items() if (output_dir / folder).is_dir())
    lines.append(f"- {saved}`training_config.yaml` (the resolved configuration), `samples/` (the final samples, made "
                 "from the files above).")
    return "\n".join(lines)


def write_model_card(output_dir: Path, config: RunConfig, facts: CardFacts) -> Path:
    """Write README.md into `output_dir` atomically; returns its path."""
    from huggingface_hub import ModelCard, ModelCardData

    argv = list(sys.argv[1:] if facts.argv is None else facts.argv)
    paths = local_paths([config.to_dict(), str(output_dir), argv])
    m, t = config.model, config.training
    base = public_name(m.pretrained_model_name_or_path)
    repo = t.hub_model_id or output_dir.name
    trigger = trigger_words(config)
    card_data = ModelCardData(
        library_name="diffusers",
        base_model=None if is_local_path(m.pretrained_model_name_or_path) else base,
        tags=["sadm", "diffusers", "diffusers-training", *facts.family_tags,
              *(tag for section in config.term_sections.values() for tag in section.card_tags()),
              *(LORA_TAGS if m.use_lora else [])],
        widget=[{"text": text, "output": {"url": url}} for text, url in facts.widget] or None,
        instance_prompt=trigger,
        **inherited_license(m),
    )
    intro = "; ".join(filter(None, (section.card_intro() for section in config.term_sections.values())))
    tables = [table for section in config.term_sections.values() if (table := section.card_table())]
    settings = "".join(f"## {heading}\n\n| option | value |\n|---|---|\n"
                       + "".join(f"| `{k}` | `{v}` |\n" for k, v in rows) + "\n" for heading, rows in tables)
    stats = "\n".join(f"- {k}: {v}" for k, v in facts.summary.items())
    ema_note = (f"The exported weights are the exponential moving average (decay {t.ema_decay}) of the trained weights."
                if t.use_ema else "The exported weights are the final trained weights (no EMA).")
    if t.use_ema and m.train_text_encoder:
        ema_note = ema_note[:-1] + "; the text encoders' LoRA is its final trained weights (no EMA)."
    kind = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}[m.lora_type]
    trained = (f"as a {kind} (rank {m.lora_rank}, alpha {m.lora_alpha or m.lora_rank}, on "
               f"{', '.join(m.lora_target_modules) if m.lora_target_modules else 'the family default modules'}) "
               if m.use_lora else "")
    if m.train_text_encoder:  # the text encoders' LoRA (tuners/lora.make_text_encoder_lora_config)
        from ..tuners.lora import TEXT_ENCODER_TARGETS

        rank = m.text_encoder_lora_rank or m.lora_rank
        trained += (f"with a LoRA on the text encoder(s) too (rank {rank}, alpha {m.lora_alpha or rank}, on "
                    f"{', '.join(TEXT_ENCODER_TARGETS)}; in the same LoRA file(s)) ")
    usages = "\n\n".join(f"{heading}\n\n```python\n{code}\n```" for heading, code in facts.usages)
    if trigger:
        listed = "\n".join(f"- `{p}`" for p in facts.prompts)
        made = f" The samples above were made with:\n\n{listed}\n" if facts.prompts else "\n"
        prompts = f"\n## Trigger words\n\nUse `{trigger}` in the prompt to trigger what this model learned.{made}"
    elif facts.prompts:
        listed = "\n".join(f"- `{p}`" for p in facts.prompts)
        prompts = (f"\n## Prompts\n\nThe samples above were made with these prompts (no trigger words set):\n\n"
                   f"{listed}\n")
    else:
        prompts = ""
    in_folder = "with the resolved configuration saved beside the weights"
    fetch = f"hf download {repo} training_config.yaml --local-dir {output_dir.name}\n" if t.hub_model_id else ""
    resolved = shlex.join([*launch_prefix(facts.num_processes, facts.mixed_precision), "train_sadm.py", "--config",
                           f"{repo_relative(str(output_dir))}/training_config.yaml"])
    content = f"""---
{card_data.to_yaml()}
---

# {output_dir.name}

Fine-tuned from `{base}` {trained}with sadm-finetune{" " + intro if intro else ""}.

- Data: {facts.data_description}{_prior_line(config)}
{stats}

{ema_note}

![samples](samples/final.png)

## Files

{_files_section(output_dir, config, facts, repo, base)}

## Use

{usages}
{prompts}
{settings}## Reproduce

From the root of the sadm-finetune repository:

```bash
{reproduce_command(argv, facts.num_processes, facts.mixed_precision)}
# or, {in_folder}:
{fetch}{resolved}
```
"""
    card = ModelCard(scrub(content, paths))
    path = output_dir / "README.md"
    tmp = output_dir / ".tmp-README.md"
    card.save(tmp)
    os.replace(tmp, path)
    return path
