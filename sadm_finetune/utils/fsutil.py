"""Filesystem helpers for writes that must never leave a half-written result in place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def move_into_place(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` (same filesystem). An existing `dst` folder is first renamed aside and
    removed only after the new one is in place, so `dst` is always either old-complete or new-complete."""
    if dst.is_dir():
        stale = dst.with_name(f".tmp-old-{dst.name}")
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(dst, stale)
        os.replace(src, dst)
        shutil.rmtree(stale)
    else:
        os.replace(src, dst)
