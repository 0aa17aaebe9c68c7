"""export/outputs.py: local paths recognised and scrubbed to their public names, grids and exports written
atomically (model_index.json last)."""

import numpy as np
from PIL import Image

from sadm_finetune.export import outputs


def test_local_paths_are_scrubbed_to_their_last_component(tmp_path):
    folder = tmp_path / "my-base"
    folder.mkdir()
    assert outputs.is_local_path(str(folder)) and outputs.is_local_path("./x") and not outputs.is_local_path("org/id")
    assert outputs.public_name(str(folder)) == "my-base" and outputs.public_name("org/id") == "org/id"
    paths = outputs.local_paths({"a": [str(folder)], "b": "org/id", "c": 3})
    assert paths[str(folder)] == "my-base" and "org/id" not in paths
    text = f"trained from {folder}/unet with org/id"
    assert outputs.scrub(text, paths) == "trained from my-base/unet with org/id"


def test_save_grid_writes_one_png_atomically(tmp_path):
    images = np.zeros((2, 3, 4, 4, 3))
    images[1, 2] = 1.0
    path = outputs.save_grid(images, tmp_path / "samples" / "g.png")
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (8, 12, 3) and (pixels[4:, 8:] == 255).all() and pixels[:4].max() == 0
    assert [p.name for p in path.parent.iterdir()] == ["g.png"]


def test_save_pipeline_atomically_moves_model_index_last(tmp_path, monkeypatch):
    class Pipeline:
        def save_pretrained(self, folder, safe_serialization):
            (folder / "unet").mkdir(parents=True)
            (folder / "unet" / "w.safetensors").write_text("new")
            (folder / "model_index.json").write_text("{}")

    out = tmp_path / "out"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "w.safetensors").write_text("old")
    moved = []
    real = outputs.move_into_place
    monkeypatch.setattr(outputs, "move_into_place", lambda src, dst: moved.append(dst.name) or real(src, dst))
    outputs.save_pipeline_atomically(Pipeline(), out)
    assert moved == ["unet", "model_index.json"]
    assert (out / "unet" / "w.safetensors").read_text() == "new" and sorted(p.name for p in out.iterdir()) == [
        "model_index.json", "unet"]
