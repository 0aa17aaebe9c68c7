"""Resumable checkpoints through `accelerator.save_state`, written atomically and rotated."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from .errors import InputError
from .fsutil import move_into_place

_NAME = re.compile(r"^checkpoint-(\d+)$")


class TrainState:
    """Loop counters that `save_state` must carry (registered with `register_for_checkpointing`)."""

    def __init__(self) -> None:
        self.global_step = 0  # denoiser updates done (skipped non-finite ones included)
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of `epoch` already consumed
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None  # nothing yet: a fresh start, as `latest` promises
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        path = checkpoints_dir(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        raise InputError(
            f"resume_from_checkpoint: {resume_from_checkpoint} not found; pass `latest` or a folder under "
            f"{checkpoints_dir(output_dir)}"
        )
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, total_limit: int | None) -> Path:
    """All ranks write into a temporary folder; the main process renames it into place, then rotates.

    A crash mid-write leaves only a `.tmp-` folder, which `latest` never picks up.
    """
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        move_into_place(tmp, final)  # the same step saved again (e.g. a resumed run) is replaced
        if total_limit is not None:
            for stale in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final
