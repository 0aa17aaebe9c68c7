"""evaluation/reference.py: an image folder as a reference set (labels from class subfolders, or unlabelled),
centre-cropped to square on load, and one-line errors before any sampling."""

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sadm_finetune.evaluation.reference import open_reference
from sadm_finetune.utils.errors import InputError


def source(**kwargs):
    values = dict(reference_dir=None, reference_dataset=None, reference_split="train", image_column="image",
                  label_column="label")
    values.update(kwargs)
    return SimpleNamespace(**values)


def test_class_subfolders_give_labels_and_images_load_square(tmp_path):
    for c, name in enumerate(("cat", "dog")):
        (tmp_path / name).mkdir()
        for i in range(2):
            pixels = np.zeros((10, 20, 3), np.uint8)
            pixels[:, 5:15] = 50 + 100 * c  # the centre square
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    ref = open_reference(source(reference_dir=str(tmp_path)))
    assert ref.num_images == 4 and ref.labels.tolist() == [0, 0, 1, 1] and ref.label_names == ["cat", "dog"]
    assert ref.name == tmp_path.name and ref.description.startswith("dir:")
    images = ref.load(np.array([0, 3]), 5)
    assert images.shape == (2, 5, 5, 3) and (images[0] == 50).all() and (images[1] == 150).all()


def test_a_flat_folder_is_unlabelled_and_bad_folders_fail_in_one_line(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    ref = open_reference(source(reference_dir=str(tmp_path)))
    assert ref.num_images == 1 and ref.labels is None and ref.label_names is None
    with pytest.raises(InputError, match=r"^--reference_dir: folder .* not found"):
        open_reference(source(reference_dir=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"^--reference_dir: no .* images in"):
        open_reference(source(reference_dir=str(tmp_path / "empty")))
