"""The output folder: never written over unless told, and a failed run's own leftovers never in the way.

A run writes `MARKER` into output_dir when it starts writing there, and removes it after its first applied
update. A folder that holds the marker and nothing but what a run writes before that update (the marker,
`training_config.yaml`, the tracker folder, validation samples) is what a run left when it stopped before
training (an unreadable image in the first batch, a crash, a kill): the next run writes into it without
--overwrite_output_dir and says so in one line. Anything else in the folder (a user's file, a checkpoint,
an export) still refuses it, and nothing is ever deleted.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpointing import checkpoints_dir, list_checkpoints
from ..utils.errors import InputError

MARKER = ".sadm_run_started"


def leftover_entries(out: Path, logging_dir: str) -> list[str] | None:
    """The names in `out` if all of them are a stopped run's leftovers (its marker present), else None."""
    marker = out / MARKER
    if not marker.is_file():
        return None
    try:
        recorded = json.loads(marker.read_text())["leftovers"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a marker this toolkit wrote
    allowed = {MARKER, *recorded, *_entries_before_training(logging_dir)}
    names = sorted(p.name for p in out.iterdir())
    return names if set(names) <= allowed else None


def _entries_before_training(logging_dir: str) -> list[str]:
    """What a run writes into output_dir before its first applied update (validation may already sample)."""
    logs = Path(logging_dir)
    return ["training_config.yaml", "samples", *([logs.parts[0]] if logs.parts and not logs.is_absolute() else [])]


def check_output_dir(config) -> tuple[Path, list[str] | None]:
    """Never write into a user's non-empty folder unless told to (or resuming in it). Returns the folder and, when
    it holds only a stopped run's leftovers (which this run reuses), their names."""
    out = Path(config.training.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir: {out} is a file; pass a folder path")
    t = config.training
    busy = out.is_dir() and any(out.iterdir())
    if not busy or t.overwrite_output_dir:
        return out, None
    leftovers = leftover_entries(out, t.logging_dir)
    if leftovers is not None:
        return out, leftovers
    found = list_checkpoints(out)
    what = "a finished export (model_index.json)" if (out / "model_index.json").exists() else "files"
    if not t.resume_from_checkpoint:
        resume = "--resume_from_checkpoint latest to continue it, " if found else ""
        raise InputError(
            f"output_dir: {out} exists and is not empty (it holds {what}); pass --overwrite_output_dir to write into "
            f"it, {resume}or another --output_dir"
        )
    if t.resume_from_checkpoint == "latest" and not found:
        # Training from step 0 here would overwrite what the folder holds (e.g. a finished run's export).
        raise InputError(
            f"resume_from_checkpoint: no checkpoint found in {checkpoints_dir(out)}, so there is nothing to resume, "
            f"and {out} holds {what} that a fresh run would overwrite; pass --overwrite_output_dir to train from "
            "step 0 into it, or another --output_dir"
        )
    return out, None


class StartMarker:
    """Main process: `write` when the run starts writing into output_dir, `clear_after_update` after each update
    (removes the marker at the first applied one), `clear` at the end."""

    def __init__(self, out: Path, logging_dir: str) -> None:
        self.path = out / MARKER
        self.logging_dir = logging_dir
        self.pending = False

    def write(self) -> None:
        note = ("Written by sadm-train when a run starts, removed after its first applied update. A folder holding "
                "only this file and the leftovers below is a run that stopped before training: the next run reuses it.")
        self.path.write_text(json.dumps({"note": note, "leftovers": _entries_before_training(self.logging_dir)},
                                        indent=1) + "\n")
        self.pending = True

    def clear_after_update(self, global_step: int, skipped_updates: int) -> None:
        if self.pending and global_step > skipped_updates:  # at least one update was applied
            self.clear()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self.pending = False
