"""evaluation/grid.py: grids side by side with a one-tile white gap, labels in a band above, written atomically."""

import numpy as np
from PIL import Image

from sadm_finetune.evaluation.grid import display_name, write_grid


def test_two_grids_side_by_side_with_a_white_gap(tmp_path):
    a = np.zeros((2, 3, 4, 5, 3), np.uint8)  # 2 rows x 3 cols of 4x5 tiles
    b = np.full((2, 3, 4, 5, 3), 100, np.uint8)
    path = tmp_path / "sub" / "grid.png"
    write_grid(str(path), [a, b])
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (8, 3 * 5 + 5 + 3 * 5, 3)
    assert (pixels[:, :15] == 0).all() and (pixels[:, 15:20] == 255).all() and (pixels[:, 20:] == 100).all()
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]  # no temporary file left


def test_labels_add_a_band_above(tmp_path):
    a = np.zeros((1, 2, 8, 8, 3), np.uint8)
    write_grid(str(tmp_path / "g.png"), [a, a], labels=["base", "a much longer name than fits"])
    pixels = np.asarray(Image.open(tmp_path / "g.png"))
    band = pixels.shape[0] - 8
    assert pixels.shape[1] == 8 * 2 * 2 + 8 and band > 0
    assert (pixels[band:, :16] == 0).all() and (pixels[:band] < 255).any()  # text drawn in the band


def test_display_name(tmp_path):
    assert display_name("facebook/DiT-XL-2-256") == "facebook/DiT-XL-2-256"
    assert display_name(str(tmp_path)) == tmp_path.name
