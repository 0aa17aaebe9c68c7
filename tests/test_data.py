import numpy as np
import pytest
import torch
from PIL import Image

from sadm_finetune.config import DataConfig
from sadm_finetune.data import ImageTransform, TrainDataset, collate, open_train_data
from sadm_finetune.errors import InputError
from tiny_pipelines import build_image_folder


def test_class_subfolders_become_sorted_ids(tmp_path):
    root = build_image_folder(tmp_path / "data", classes=("zebra", "ant", "mole"), per_class=2)
    data = open_train_data(DataConfig(train_data_dir=str(root)))
    assert data.id2label == {0: "ant", 1: "mole", 2: "zebra"}
    assert len(data) == 6 and data.max_class_id() == 2
    ds = TrainDataset(data, ImageTransform(32, center_crop=True, random_flip=False))
    by_label = {}
    for i in range(len(ds)):
        by_label.setdefault(ds[i]["class_labels"], 0)
        by_label[ds[i]["class_labels"]] += 1
    assert by_label == {0: 2, 1: 2, 2: 2}


def test_flat_folder_is_unconditional(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / f"{i}.png")
    data = open_train_data(DataConfig(train_data_dir=str(root)))
    assert data.label_column is None and data.id2label is None
    batch = collate([TrainDataset(data, ImageTransform(8, True, False))[i] for i in range(3)])
    assert "class_labels" not in batch and batch["pixel_values"].shape == (3, 3, 8, 8)


def test_missing_and_empty_folders_fail_clearly(tmp_path):
    with pytest.raises(InputError, match="train_data_dir: folder .* not found"):
        open_train_data(DataConfig(train_data_dir=str(tmp_path / "nope")))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="train_data_dir: no images"):
        open_train_data(DataConfig(train_data_dir=str(tmp_path / "empty")))


def test_unreadable_image_errors_or_is_skipped(tmp_path):
    root = build_image_folder(tmp_path / "data", per_class=2)
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    data = open_train_data(DataConfig(train_data_dir=str(root)))
    broken = next(i for i in range(len(data)) if "broken" in (data.dataset[i]["image"]["path"] or ""))
    strict = TrainDataset(data, ImageTransform(32, True, False), on_bad_image="error")
    with pytest.raises(InputError, match="broken.png.*--on_bad_image skip"):
        strict[broken]
    lenient = TrainDataset(data, ImageTransform(32, True, False), on_bad_image="skip")
    sample = lenient[broken]
    assert sample["pixel_values"].shape == (3, 32, 32) and lenient.num_skipped == 1


def test_transform_resizes_crops_and_scales():
    img = Image.fromarray(np.full((40, 60, 3), 255, np.uint8))
    out = ImageTransform(32, center_crop=False, random_flip=True)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out, torch.ones_like(out))
    ramp = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3))
    flipped = [ImageTransform(32, True, True)(Image.fromarray(ramp)) for _ in range(20)]
    assert any(f[0, 0, 0] > f[0, 0, -1] for f in flipped) and any(f[0, 0, 0] < f[0, 0, -1] for f in flipped)


def test_builtin_digits():
    data = open_train_data(DataConfig(dataset_name="builtin:digits", max_train_samples=20))
    assert len(data) == 20 and data.id2label[9] == "9"
    sample = TrainDataset(data, ImageTransform(32, True, False))[0]
    assert sample["pixel_values"].shape == (3, 32, 32) and sample["class_labels"] == 0
    assert sample["pixel_values"].min() >= -1 and sample["pixel_values"].max() <= 1
