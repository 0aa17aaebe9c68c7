"""Family defaults (family_defaults.py, docs/defaults.md): a pipeline family's upstream-script values fill the fields
the user did not set (neither YAML nor flag); the user's values win; the dry run and the saved YAML show them."""

import dataclasses
import json

import pytest
import yaml

from sadm_finetune.cli import main, parse_config
from sadm_finetune.config.run import RunConfig, build_config, field_index
from sadm_finetune.families.defaults import FAMILY_DEFAULTS, defaults_for
from sadm_finetune.config.fields import field_default
from sadm_finetune.families.loading import FAMILIES


def _index_only(tmp_path, class_name):
    """A folder holding only a model_index.json: all the family defaults read."""
    folder = tmp_path / class_name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return str(folder)


def test_the_table_names_real_pipelines_and_fields_and_changes_something():
    pipelines = {c for family in FAMILIES for c in family.pipeline_classes}
    index = field_index()
    for class_name, values in FAMILY_DEFAULTS.items():
        assert class_name in pipelines, class_name
        for name, value in values.items():
            assert name in index, name
            assert value != field_default(index[name][1]), (class_name, name)  # not a copy of the generic default
    assert FAMILY_DEFAULTS["StableDiffusion3Pipeline"] == {  # train_dreambooth_lora_sd3.py's defaults
        "adam_weight_decay": 1e-4, "weighting_scheme": "logit_normal", "precondition_outputs": True}
    assert FAMILY_DEFAULTS["FluxPipeline"] == {"adam_weight_decay": 1e-4, "guidance_scale": 3.5}  # ..._flux.py's


@pytest.mark.parametrize("class_name", sorted(FAMILY_DEFAULTS))
def test_family_defaults_fill_only_the_fields_the_user_did_not_set(tmp_path, class_name):
    source = _index_only(tmp_path, class_name)
    expected = FAMILY_DEFAULTS[class_name]
    config = build_config({"pretrained_model_name_or_path": source, "train_data_dir": "d"})
    flat = config.flat()
    assert {k: flat[k] for k in expected} == expected and config.family_defaults == expected
    # A value the user sets wins, on the command line or in the YAML, even when it equals the generic default.
    name = next(iter(expected))
    generic = field_default(field_index()[name][1])
    again = build_config({"pretrained_model_name_or_path": source, "train_data_dir": "d", name: generic})
    assert again.flat()[name] == generic and name not in again.family_defaults
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"pretrained_model_name_or_path": source, "train_data_dir": "d", name: generic}))
    assert parse_config(["--config", str(recipe)])[0].flat()[name] == generic
    # The saved YAML holds the resolved values: it reproduces the run.
    saved = tmp_path / "saved.yaml"
    saved.write_text(config.to_yaml())
    assert parse_config(["--config", str(saved)])[0] == config


@pytest.mark.parametrize("class_name", ["DiTPipeline", "PixArtSigmaPipeline"])
def test_families_whose_upstream_matches_the_generic_defaults_get_none(tmp_path, class_name):
    config = build_config({"pretrained_model_name_or_path": _index_only(tmp_path, class_name), "train_data_dir": "d"})
    unreadable = build_config({"pretrained_model_name_or_path": "not/a/readable/model", "train_data_dir": "d"})
    assert config.family_defaults == {} and dataclasses.replace(config, model=unreadable.model) == unreadable
    assert defaults_for("missing/folder/x") == {} and defaults_for(None) == {}  # unreadable: the run reports it later


def test_dry_run_prints_the_family_defaults(tmp_path, capsys):
    source = _index_only(tmp_path, "StableDiffusion3Pipeline")
    assert main(["--pretrained", source, "--train_data_dir", "d", "--dry_run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["flow_matching"]["weighting_scheme"] == "logit_normal"
    assert printed["flow_matching"]["precondition_outputs"] is True
    assert printed["training"]["adam_weight_decay"] == 1e-4
    assert main(["--pretrained", source, "--train_data_dir", "d", "--dry_run", "--no_precondition_outputs"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["flow_matching"]["precondition_outputs"] is False


def test_the_record_of_applied_defaults_is_not_an_option():
    assert RunConfig() == dataclasses.replace(RunConfig(), family_defaults={"seed": 1})
    assert "family_defaults" not in RunConfig().to_yaml()
