"""sadm-eval's sample grids: one pipeline's, or two side by side with their names above the columns."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_grid(path: str, grids: list[np.ndarray], labels: list[str] | None = None) -> None:
    """Grids ``(rows, cols, H, W, 3)`` uint8 side by side, a white column between them; with ``labels``,
    each grid's label is written in a white band above it."""
    from PIL import Image

    blocks = [grid.transpose(0, 2, 1, 3, 4).reshape(grid.shape[0] * grid.shape[2], -1, 3) for grid in grids]
    gap = np.full((blocks[0].shape[0], grids[0].shape[3], 3), 255, np.uint8)  # one tile wide
    pieces = [piece for block in blocks for piece in (block, gap)][:-1]
    image = Image.fromarray(np.concatenate(pieces, axis=1).astype(np.uint8))
    if labels:
        image = _label_columns(image, [b.shape[1] for b in blocks], gap.shape[1], labels)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    image.save(tmp, format="PNG")
    os.replace(tmp, out)


def _label_columns(image, widths: list[int], gap: int, labels: list[str]):
    """A white band above ``image`` with each label centred over its column block (PIL's default font),
    shortened in the middle (``..``) when it is wider than the block."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    height = measure.textbbox((0, 0), "Agjy", font=font)[3] + 6
    labelled = Image.new("RGB", (image.width, image.height + height), "white")
    labelled.paste(image, (0, height))
    draw = ImageDraw.Draw(labelled)
    left = 0
    for label, width in zip(labels, widths):
        text, keep = label, len(label)
        while keep > 1 and measure.textlength(text, font=font) > width - 2:
            keep -= 1
            head, tail = (keep + 1) // 2, keep // 2
            text = label[:head] + ".." + (label[-tail:] if tail else "")
        x = left + max(0, (width - measure.textlength(text, font=font)) / 2)
        draw.text((x, 3), text, fill="black", font=font)
        left += width + gap
    return labelled


def display_name(source: str) -> str:
    """A pipeline's name for people: a Hub id as is, a local folder by its last component."""
    path = Path(source).expanduser()
    return path.resolve().name if path.exists() else source
