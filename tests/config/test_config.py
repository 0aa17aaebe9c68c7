import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sadm_finetune.cli import main, parse_config
from sadm_finetune.config.run import RunConfig, build_config, load_yaml
from sadm_finetune.utils.errors import ConfigError

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
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "train_sadm.py"), *REQUIRED, "--train_batch_size", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "train_batch_size" in proc.stderr and "Traceback" not in proc.stderr


def test_run_config_equality_is_by_value():
    # Equal when every value is equal (the dry-run round trip above relies on it), unequal when any one differs;
    # list defaults are copies, so changing one config's list leaves another's alone.
    assert RunConfig() == RunConfig() and RunConfig() is not RunConfig()
    a, b = parse_config(REQUIRED)[0], parse_config(REQUIRED)[0]
    assert a == b
    assert a != parse_config(REQUIRED + ["--structure_weight", "0.02"])[0]
    assert a != parse_config(REQUIRED + ["--validation_class_labels", "3"])[0]
    c = parse_config(REQUIRED + ["--validation_class_labels", "1", "2"])[0]
    d = parse_config(REQUIRED + ["--validation_class_labels", "1", "2"])[0]
    assert c == d
    d.training.validation_class_labels.append(3)
    assert c != d and c.training.validation_class_labels == [1, 2]


@pytest.mark.parametrize("argv, suggestion", [
    (["--max_train_step", "10"], "--max_train_steps"),  # an abbreviation of a real flag is not accepted
    (["--max_train_step=10"], "--max_train_steps"),
    (["--structure_wieght", "1"], "--structure_weight"),
    (["--pretrain", "x"], "--pretrained"),
])
def test_unknown_or_abbreviated_flag_is_one_line_naming_the_closest(argv, suggestion, capsys):
    assert main(REQUIRED + argv + ["--dry_run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.count("\n") == 0 and f"did you mean {suggestion}?" in err, err
    assert err.startswith(f"sadm-train: error: {argv[0].split('=')[0]}: unrecognized argument")


def test_sadm_eval_refuses_abbreviations_and_suggests(capsys):
    from sadm_finetune.evaluation.evaluate import main as eval_main

    assert eval_main(["--pipeline", "x", "--reference_dir", "y", "--samples_per_cl", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--samples_per_cl: unrecognized argument" in err
    assert "did you mean --samples_per_class?" in err
    assert eval_main(["--pipelin", "x", "--reference_dir", "y"]) == 2  # the typo is named, not "--pipeline missing"
    assert "did you mean --pipeline?" in capsys.readouterr().err


def _help(parser) -> str:
    return " ".join(parser.format_help().split())  # argparse wraps lines; compare with single spaces


def test_help_shows_defaults_and_a_short_usage():
    from sadm_finetune.cli import build_parser
    from sadm_finetune.evaluation.evaluate import build_parser as eval_parser

    text = _help(build_parser())
    assert "--structure_weight FLOAT lambda: weight of the structure loss" in text
    assert "(0: plain fine-tune). (default: 0.01)" in text
    assert "--disc_learning_rate FLOAT" in text and "(default: 0.0001)" in text
    assert "--relation {cosine,euclidean,rbf} Pairwise relation between embeddings. (default: cosine)" in text
    assert "--disc_spectral_norm Spectral normalisation on the discriminator's convs and linears. (default: on; " \
           "--no_disc_spectral_norm turns it off)" in text
    assert "--center_crop Center-crop to the resolution (default: random crop). (default: off)" in text
    assert "--max_train_steps INT" in text
    eval_text = _help(eval_parser())
    assert "(default: 50)" in eval_text and "--pipeline STR" in eval_text and "(required)" in eval_text
    for parser in (build_parser(), eval_parser()):
        usage = parser.format_usage()
        assert usage.count("\n") == 1 and len(usage) < 200, usage  # one line, not every flag
        help_lines = parser.format_help().splitlines()
        first_flag = next(i for i, line in enumerate(help_lines) if line.strip().startswith("-h, --help"))
        assert first_flag < 12, help_lines[:first_flag]  # the description comes within the first screen


def test_the_default_recipe_is_ema_with_warmup_and_a_decaying_schedule():
    """The recipe fine-tuning needs (the mechanism study: without it SADM hurt): cosine decay, a warm-up of 5% of
    the run (at most 500 steps), and EMA on unless the user turns it off or FSDP cannot hold it."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from sadm_finetune.train.entry import _check_distributed_type

    c = build_config({"pretrained_model_name_or_path": "x", "train_data_dir": "y", "max_train_steps": 1000})
    assert c.training.lr_scheduler == "cosine" and c.training.lr_warmup_steps == 50
    assert build_config({"pretrained_model_name_or_path": "x", "train_data_dir": "y", "max_train_steps": 50000}
                        ).training.lr_warmup_steps == 500
    assert build_config({"pretrained_model_name_or_path": "x", "train_data_dir": "y", "lr_warmup_steps": 0}
                        ).training.lr_warmup_steps == 0
    assert c.training.use_ema is None  # decided when the launch is known
    printed = []
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, print=printed.append, mixed_precision="no")
    _check_distributed_type(c, ddp)
    assert c.training.use_ema is True and not printed
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, print=printed.append, mixed_precision="no")
    c = build_config({"pretrained_model_name_or_path": "x", "train_data_dir": "y", "structure_weight": 0})
    _check_distributed_type(c, fsdp)
    assert c.training.use_ema is False and "EMA: off under FSDP" in printed[0]
    off = build_config({"pretrained_model_name_or_path": "x", "train_data_dir": "y", "use_ema": False})
    _check_distributed_type(off, ddp)
    assert off.training.use_ema is False


def test_seed_none_draws_a_fresh_seed_that_is_logged_saved_and_kept_on_resume(tmp_path):
    """`--seed none` is a fresh random seed (not 0): drawn once, printed, and written to training_config.yaml so
    that the run can be repeated; the draw differs from call to call. The same command resuming the run's
    checkpoint continues with that run's seed, not a new draw."""
    from types import SimpleNamespace

    from launch import tiny_run_args, train_in_process
    from sadm_finetune.train.distributed import shared_random_seed
    from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

    single = SimpleNamespace(num_processes=1)
    draws = {shared_random_seed(single) for _ in range(4)}
    assert len(draws) > 1 and all(isinstance(s, int) and 0 <= s < 2**31 for s in draws)
    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=1) + [
        "--seed", "none", "--structure_weight", "0", "--report_to", "none", "--validation_inference_steps", "1",
        "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    drawn = re.findall(r"^seed: none given; drew --seed (\d+) ", proc.stdout + proc.stderr, flags=re.M)
    assert len(drawn) == 1, (proc.stdout + proc.stderr)[-3000:]
    saved = yaml.safe_load((out / "training_config.yaml").read_text())["training"]["seed"]
    assert saved == int(drawn[0])

    resumed = train_in_process(args + ["--max_train_steps", "2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming checkpoint-1 with its run's --seed {saved}" in resumed.stdout + resumed.stderr
    assert yaml.safe_load((out / "training_config.yaml").read_text())["training"]["seed"] == saved


def test_xformers_is_checked_once_when_the_config_is_built(monkeypatch):
    """Before any model loads: a CUDA GPU (tests/test_recipes.py) and the package installed."""
    import importlib.util

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else
                        real_find_spec(name, *a))
    with pytest.raises(ConfigError) as e:
        build_config({"pretrained_model_name_or_path": "m", "train_data_dir": "d",
                      "enable_xformers_memory_efficient_attention": True})
    assert e.value.field == "enable_xformers_memory_efficient_attention" and "not installed" in str(e.value)
