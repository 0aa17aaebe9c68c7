import numpy as np
import pytest
import torch
from PIL import Image

from sadm_finetune.config.run import DataConfig
from sadm_finetune.data.datasets import ImageTransform, TrainDataset, collate, open_train_data
from sadm_finetune.utils.errors import InputError
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
    out, geometry = ImageTransform(32, center_crop=False, random_flip=True)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert geometry.original_size == (40, 60) and geometry.resized_size == (32, 48) and geometry.target_size == (32, 32)
    assert torch.allclose(out, torch.ones_like(out))
    ramp = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3))
    flipped = [ImageTransform(32, True, True)(Image.fromarray(ramp))[0] for _ in range(20)]
    assert any(f[0, 0, 0] > f[0, 0, -1] for f in flipped) and any(f[0, 0, 0] < f[0, 0, -1] for f in flipped)


def test_builtin_digits():
    data = open_train_data(DataConfig(dataset_name="builtin:digits", max_train_samples=20))
    assert len(data) == 20 and data.id2label[9] == "9"
    sample = TrainDataset(data, ImageTransform(32, True, False))[0]
    assert sample["pixel_values"].shape == (3, 32, 32) and sample["class_labels"] == 0
    assert sample["pixel_values"].min() >= -1 and sample["pixel_values"].max() <= 1


def test_geometry_is_the_crop_as_the_model_sees_it():
    # A 30x61 image into a 24x40 bucket: resized to cover it (24x49) and cropped; the crop's top-left is counted
    # in the resized image after any flip, so it locates the pixels the model gets.
    image = Image.fromarray((np.random.default_rng(0).random((30, 61, 3)) * 255).astype(np.uint8))
    resized = np.asarray(image.resize((49, 24), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    transform = ImageTransform(32, center_crop=False, random_flip=True)
    seen = set()
    for seed in range(40):
        pixels, geometry = transform(image, torch.Generator().manual_seed(seed), target_size=(24, 40))
        assert (geometry.original_size, geometry.resized_size, geometry.target_size) == ((30, 61), (24, 49), (24, 40))
        view = resized[:, ::-1] if geometry.flipped else resized
        y, x = geometry.crop_top_left
        np.testing.assert_allclose(pixels.numpy(), view[y:y + 24, x:x + 40].transpose(2, 0, 1), atol=1e-6)
        seen.add((geometry.flipped, x))
    assert {flipped for flipped, _ in seen} == {False, True} and len({x for _, x in seen}) > 3
    assert geometry.flip().flip() == geometry


def test_collate_stacks_geometry_and_text_embeddings_per_sample():
    samples = [{"pixel_values": torch.zeros(3, 8, 8), "original_sizes": (30 + i, 61), "crop_top_lefts": (0, i),
                "target_sizes": (8, 8), "flips": bool(i % 2), "captions": f"c{i}",
                "text_embeddings": {"prompt_embeds": torch.full((4, 2), float(i))}} for i in range(3)]
    batch = collate(samples)
    assert batch["original_sizes"].tolist() == [[30, 61], [31, 61], [32, 61]]
    assert batch["original_sizes"].dtype == torch.long and batch["crop_top_lefts"][:, 1].tolist() == [0, 1, 2]
    assert batch["flips"].tolist() == [False, True, False] and batch["target_sizes"].shape == (3, 2)
    assert batch["text_embeddings"]["prompt_embeds"].shape == (3, 4, 2)
    assert batch["text_embeddings"]["prompt_embeds"][:, 0, 0].tolist() == [0.0, 1.0, 2.0]
