"""data/folder.py: an image folder's captions by source (sidecar, metadata.jsonl, kohya folder, instance prompt),
the caption prefix, kohya repeats, masks, and the one-line refusals."""

import json

import pytest
from PIL import Image

from sadm_finetune.config.run import DataConfig
from sadm_finetune.data.folder import join_prefix, read_folder, scan_images
from sadm_finetune.utils.errors import InputError

EXT = {".png"}


def image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)


def cfg(tmp_path, **kwargs):
    return DataConfig(train_data_dir=str(tmp_path), **kwargs)


def test_captions_come_from_the_first_source_that_has_one(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    image(tmp_path / "c.png")
    (tmp_path / "a.txt").write_text("from sidecar\nsecond line ignored")
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": n, "text": f"meta {n}"})
                                                       for n in ("a.png", "b.png")))
    images, kohya, captioned = read_folder(tmp_path, cfg(tmp_path, instance_prompt="sks", caption_prefix="tok"), EXT)
    assert [(i.path.name, i.source, i.caption) for i in images] == [
        ("a.png", "sidecar", "tok from sidecar"), ("b.png", "metadata", "tok meta b.png"),
        ("c.png", "instance_prompt", "tok sks")]
    assert captioned and not kohya


def test_kohya_folders_give_repeats_and_captions_and_masks_are_not_images(tmp_path):
    image(tmp_path / "3_sks dog" / "a.png")
    image(tmp_path / "3_sks dog" / "a_mask.png")
    image(tmp_path / "1_dog" / "b.png")
    images, kohya, captioned = read_folder(tmp_path, cfg(tmp_path), EXT)
    assert kohya and captioned
    assert [(i.path.name, i.caption, i.repeats, i.mask and i.mask.name) for i in images] == [
        ("b.png", "dog", 1, None), ("a.png", "sks dog", 3, "a_mask.png")]


def test_an_uncaptioned_image_beside_captioned_ones_is_refused(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("a cat")
    with pytest.raises(InputError, match=r"^train_data_dir: image .*b.png has no caption"):
        read_folder(tmp_path, cfg(tmp_path), EXT)


def test_class_subfolders_without_captions_and_an_empty_folder(tmp_path):
    image(tmp_path / "cat" / "a.png")
    image(tmp_path / ".hidden" / "b.png")
    files, masks = scan_images(tmp_path, EXT)
    assert [p.name for p in files] == ["a.png"] and masks == {}
    images, kohya, captioned = read_folder(tmp_path, cfg(tmp_path), EXT)
    assert [(i.top, i.caption) for i in images] == [("cat", None)] and not kohya and not captioned
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="^train_data_dir: no images"):
        read_folder(tmp_path / "empty", cfg(tmp_path), EXT)


def test_join_prefix():
    assert join_prefix(None, "a dog") == "a dog" and join_prefix("sks", "a dog") == "sks a dog"
    assert join_prefix("sks", "") == "sks"
