"""families/model_index.py: a pipeline's model_index.json read without weights; bad sources fail in one line."""

import json

import pytest

from sadm_finetune.config.run import ModelConfig
from sadm_finetune.families.model_index import read_pipeline_index
from sadm_finetune.utils.errors import InputError


def test_a_pipeline_folders_index(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "vae": ["diffusers", "X"]}))
    index = read_pipeline_index(ModelConfig(pretrained_model_name_or_path=str(tmp_path)))
    assert index["_class_name"] == "DiTPipeline" and index["vae"] == ["diffusers", "X"]


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "has no model_index.json, so it is not a diffusers pipeline folder"),
    (lambda p: (p / "model_index.json").write_text("{not json"), "is not a valid model_index.json"),
    (lambda p: (p / "model_index.json").write_text("{}"), "is not a valid model_index.json"),
])
def test_a_folder_without_a_valid_index(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(InputError, match=f"^pretrained_model_name_or_path: .*{message}"):
        read_pipeline_index(ModelConfig(pretrained_model_name_or_path=str(tmp_path)))


@pytest.mark.parametrize("source, message", [
    ("/no/such/folder", "folder /no/such/folder not found"),
    ("a/b/c", "folder a/b/c not found"),
    ("bad id!", "is neither a folder nor a Hub id"),
])
def test_a_missing_folder_or_malformed_id(source, message):
    with pytest.raises(InputError, match=f"^pretrained_model_name_or_path: .*{message}"):
        read_pipeline_index(ModelConfig(pretrained_model_name_or_path=source))
