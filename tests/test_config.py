import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sadm_finetune.cli import main, parse_config
from sadm_finetune.config import RunConfig, build_config, load_yaml
from sadm_finetune.errors import ConfigError

REQUIRED = ["--pretrained", "some/model", "--train_data_dir", "data"]


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_and_alias():
    config, _ = parse_config(REQUIRED)
    assert config.model.pretrained_model_name_or_path == "some/model"
    assert config.sadm.structure_weight == 0.01 and config.sadm.enabled
    assert config.sadm.relation == "cosine" and config.sadm.timestep_weighting == "min_snr"


def test_yaml_then_flags_override(tmp_path):
    recipe = write(tmp_path, """
model:
  pretrained_model_name_or_path: from/yaml
training:
  train_batch_size: 16
  learning_rate: 3.0e-5
sadm:
  structure_weight: 0.05
  disc_spectral_norm: false
train_data_dir: flat/key/works
""")
    config, _ = parse_config(["--config", recipe, "--train_batch_size", "4", "--disc_spectral_norm"])
    assert config.model.pretrained_model_name_or_path == "from/yaml"
    assert config.data.train_data_dir == "flat/key/works"
    assert config.training.train_batch_size == 4  # flag beats YAML
    assert config.training.learning_rate == 3e-5  # YAML beats default
    assert config.sadm.structure_weight == 0.05
    assert config.sadm.disc_spectral_norm is True  # bare switch beats YAML false
    config2, _ = parse_config(["--config", recipe, "--no_disc_spectral_norm"])
    assert config2.sadm.disc_spectral_norm is False


def test_bool_flags_are_bare_switches():
    config, _ = parse_config(REQUIRED + ["--random_flip", "--center_crop"])
    assert config.data.random_flip and config.data.center_crop
    with pytest.raises(ConfigError):
        parse_config(REQUIRED + ["--random_flip", "true"])


@pytest.mark.parametrize("text, field", [
    ("sadm:\n  structure_wieght: 0.1\n", "structure_wieght"),
    ("training:\n  train_batch_size: eight\n", "train_batch_size"),
    ("training:\n  train_batch_size: 2.5\n", "train_batch_size"),
    ("sadm:\n  relation: manhattan\n", "relation"),
    ("data:\n  random_flip: 1\n", "random_flip"),
    ("model:\n  learning_rate: 0.1\n", "learning_rate"),  # right key, wrong section
    ("training: 3\n", "training"),
    ("key: [unclosed\n", "config"),
])
def test_bad_yaml_names_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as e:
        load_yaml(write(tmp_path, text))
    assert e.value.field == field
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, field", [
    ({"train_batch_size": 0}, "train_batch_size"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"max_train_steps": 0}, "max_train_steps"),
    ({"train_batch_size": 1}, "train_batch_size"),  # no pairs for SADM
    ({"disc_learning_rate": 0.0}, "disc_learning_rate"),
    ({"report_to": "myspace"}, "report_to"),
    ({"push_to_hub": True}, "hub_model_id"),
    ({"hub_model_id": "not a repo id!"}, "hub_model_id"),
    ({"class_dropout_prob": 1.5}, "class_dropout_prob"),
    ({"dataset_name": "x"}, "train_data_dir"),  # both sources
])
def test_impossible_values_fail(overrides, field):
    base = {"pretrained_model_name_or_path": "m", "train_data_dir": "d"}
    with pytest.raises(ConfigError) as e:
        build_config({**base, **overrides})
    assert e.value.field == field


def test_batch_of_one_is_fine_without_sadm():
    config = build_config({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "train_batch_size": 1,
                           "structure_weight": 0.0})
    assert not config.sadm.enabled


def test_dry_run_prints_resolved_yaml_that_round_trips(tmp_path, capsys):
    assert main(REQUIRED + ["--dry_run", "--relation", "rbf", "--validation_class_labels", "1", "2"]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert data["sadm"]["relation"] == "rbf"
    assert data["training"]["validation_class_labels"] == [1, 2]
    saved = write(tmp_path, printed, "resolved.yaml")
    again, _ = parse_config(["--config", saved])
    assert again == parse_config(REQUIRED + ["--relation", "rbf", "--validation_class_labels", "1", "2"])[0]


def test_cli_error_is_one_line_without_traceback(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "train_sadm.py"), *REQUIRED, "--train_batch_size", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "train_batch_size" in proc.stderr and "Traceback" not in proc.stderr


def test_run_config_equality_is_by_value():
    assert RunConfig() == RunConfig()
