"""Outputs of a run: the stock pipeline folder (written atomically), sample grids, push (the card: card.py).

What goes to the Hub names local paths by their last component only (a Hub id stays as it is): the
model card is written that way (on disk too), and ``push_to_hub`` uploads scrubbed copies of the text
files (``training_config.yaml``, the components' ``config.json`` ``_name_or_path``) while the files on
disk keep the full paths (so ``--config out/training_config.yaml`` still reproduces the run locally). A
binary file that holds a local path (e.g. tracker logs with the run's hyper-parameters) is left out of
the upload, and said so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..utils.fsutil import move_into_place

PUSH_IGNORE = ["checkpoints/*", "checkpoints/**", ".tmp-*", ".tmp-*/**"]
TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".md", ".txt", ".jsonl", ".py", ".cfg", ".toml")


def is_local_path(value: str) -> bool:
    """Whether a config value names something on this machine (not a Hub id)."""
    if not value or "\n" in value:
        return False
    if value.startswith(("/", "~", "./", "../")):
        return True
    try:
        return Path(value).expanduser().exists()
    except OSError:
        return False


def public_name(value: str) -> str:
    """A Hub id as it is; a local path by its last component (no home folder, user name or tmp dir)."""
    if not isinstance(value, str) or not is_local_path(value):
        return value
    return Path(value).expanduser().resolve().name or value


def local_paths(values: Any) -> dict[str, str]:
    """Absolute spellings of every local path among ``values`` (strings, lists, dicts) -> its public name."""
    found: dict[str, str] = {}

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, (str, Path)) and is_local_path(str(value)):
            path = Path(str(value)).expanduser()
            name = path.resolve().name
            for spelling in {str(value), str(path), str(path.resolve()), str(path.absolute())}:
                spelling = spelling.rstrip("/")
                if spelling.startswith("/") and len(spelling) > 1 and name:  # "~/..." names no user: kept
                    found[spelling] = name

    visit(values)
    home = str(Path.home())
    if len(home) > 1:
        found.setdefault(home, "~")  # a path that only passes through the home folder
    return found


def scrub(text: str, paths: dict[str, str]) -> str:
    """``text`` with every local path spelling replaced by its public name (longest first)."""
    for spelling in sorted(paths, key=len, reverse=True):
        text = text.replace(spelling, paths[spelling])
    return text


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


def save_models_atomically(output_dir: Path, models: dict[str, Any]) -> None:
    """Each model's `save_pretrained` into a temporary sibling folder, then moved into `output_dir/<name>` (a LoRA
    run's output without the pipeline: the structure discriminator)."""
    for name, model in models.items():
        tmp = output_dir / f".tmp-{name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        move_into_place(tmp, output_dir / name)


def save_grid(images: np.ndarray, path: Path) -> Path:
    """(rows, cols, H, W, 3) floats in [0, 1] -> one PNG, written atomically."""
    rows, cols, h, w, _ = images.shape
    grid = images.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def push_to_hub(output_dir: Path, repo_id: str, private: bool = False) -> str:
    """Upload the output folder (not the checkpoints) in one commit, text files scrubbed of local paths (those
    of ``training_config.yaml`` and the folder itself). The token comes from HF_TOKEN or the cached login."""
    import yaml
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import filter_repo_objects

    output_dir = Path(output_dir)
    recorded = output_dir / "training_config.yaml"
    config = yaml.safe_load(recorded.read_text()) if recorded.is_file() else {}
    paths = local_paths([config, str(output_dir)])
    files = sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file())
    operations, left_out = [], []
    for rel in filter_repo_objects(files, ignore_patterns=PUSH_IGNORE):
        path = output_dir / rel
        if path.suffix.lower() in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
            clean = scrub(text, paths)
            content = clean.encode("utf-8", errors="surrogateescape") if clean != text else str(path)
            operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=content))
        elif _holds_any(path, paths):
            left_out.append(rel)
        else:
            operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)))
    if left_out:
        print(f"push_to_hub: left out {len(left_out)} file(s) that hold local paths: {', '.join(left_out[:5])}"
              + (" ..." if len(left_out) > 5 else ""))
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
    commit = api.create_commit(repo_id=repo_id, repo_type="model", operations=operations,
                               commit_message="Upload SADM fine-tuned pipeline")
    return getattr(commit, "commit_url", str(commit))


def _holds_any(path: Path, paths: dict[str, str], chunk: int = 1 << 20) -> bool:
    """Whether a (binary) file contains any of the path spellings, read in overlapping chunks."""
    needles = [p.encode() for p in paths]
    if not needles:
        return False
    overlap = max(len(n) for n in needles)
    tail = b""
    with path.open("rb") as f:
        while block := f.read(chunk):
            data = tail + block
            if any(n in data for n in needles):
                return True
            tail = data[-overlap:]
    return False
