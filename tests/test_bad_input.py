"""Every user error: exit status 2, one line naming the field or file and the fix, no traceback."""

import json
import shutil

import pytest

from sadm_finetune.cli import main
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    base = build_tiny_dit_pipeline(root / "base", num_classes=2)
    data = build_image_folder(root / "data", per_class=3)
    not_a_pipeline = root / "not_a_pipeline"
    not_a_pipeline.mkdir()
    (not_a_pipeline / "config.json").write_text("{}")
    flux = root / "flux"
    shutil.copytree(base, flux)
    index = json.loads((flux / "model_index.json").read_text())
    (flux / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    corrupt = root / "corrupt"
    shutil.copytree(base, corrupt)
    weights = next((corrupt / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])
    pickle_only = root / "pickle_only"
    shutil.copytree(base, pickle_only)
    from diffusers import DiTTransformer2DModel

    tr = DiTTransformer2DModel.from_pretrained(base / "transformer")
    shutil.rmtree(pickle_only / "transformer")
    tr.save_pretrained(pickle_only / "transformer", safe_serialization=False)
    empty = root / "empty"
    (empty / "cls").mkdir(parents=True)
    busy = root / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    big_labels = root / "big_labels"
    import datasets
    import numpy as np
    from PIL import Image

    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(np.zeros((32, 32, 3), np.uint8))] * 4,
                                     "label": [0, 1, 2, 5000]})
    big_labels.mkdir()
    ds.to_parquet(str(big_labels / "train.parquet"))
    (root / "bad.yaml").write_text("training: {train_batch_size: [\n")
    (root / "unknown.yaml").write_text("sadm:\n  lambda: 0.1\n")
    return {"root": root, "base": base, "data": data, "not_a_pipeline": not_a_pipeline, "flux": flux,
            "corrupt": corrupt, "pickle_only": pickle_only, "empty": empty, "busy": busy, "big_labels": big_labels}


def ok_args(w, out):
    return ["--pretrained", str(w["base"]), "--train_data_dir", str(w["data"]), "--output_dir", str(out),
            "--max_train_steps", "1", "--train_batch_size", "2", "--report_to", "none"]


def replace(args, flag, value):
    args = list(args)
    if flag in args:
        i = args.index(flag)
        if value is None:
            del args[i:i + 2]
        else:
            args[i + 1] = value
    elif value is not None:
        args += [flag, value]
    return args


CASES = [
    ("missing pretrained folder", lambda w, a: replace(a, "--pretrained", str(w["root"] / "nope")),
     "pretrained_model_name_or_path: folder"),
    ("folder that is no pipeline", lambda w, a: replace(a, "--pretrained", str(w["not_a_pipeline"])),
     "has no model_index.json"),
    ("pipeline of another family", lambda w, a: replace(a, "--pretrained", str(w["flux"])), "FluxPipeline"),
    ("corrupt weight file", lambda w, a: replace(a, "--pretrained", str(w["corrupt"])),
     "pretrained_model_name_or_path:"),
    ("pickle-only weights", lambda w, a: replace(a, "--pretrained", str(w["pickle_only"])), "--allow_pickle_weights"),
    ("no pretrained at all", lambda w, a: replace(a, "--pretrained", None), "pretrained_model_name_or_path: is required"),
    ("missing data folder", lambda w, a: replace(a, "--train_data_dir", str(w["root"] / "nodata")),
     "train_data_dir: folder"),
    ("empty data folder", lambda w, a: replace(a, "--train_data_dir", str(w["empty"])), "train_data_dir: no images"),
    ("no data at all", lambda w, a: replace(a, "--train_data_dir", None), "--train_data_dir or --dataset_name"),
    ("bad YAML", lambda w, a: a + ["--config", str(w["root"] / "bad.yaml")], "config:"),
    ("unknown YAML key", lambda w, a: a + ["--config", str(w["root"] / "unknown.yaml")], "lambda: unknown key"),
    ("missing YAML file", lambda w, a: a + ["--config", str(w["root"] / "none.yaml")], "config: file"),
    ("unknown flag", lambda w, a: a + ["--structure_wieght", "1"], "did you mean --structure_weight?"),
    ("abbreviated flag", lambda w, a: a + ["--structure_w", "1"], "--structure_w: unrecognized argument"),
    ("wrong type", lambda w, a: replace(a, "--train_batch_size", "two"), "--train_batch_size"),
    ("zero batch", lambda w, a: replace(a, "--train_batch_size", "0"), "train_batch_size: must be > 0"),
    ("zero steps", lambda w, a: replace(a, "--max_train_steps", "0"), "max_train_steps: must be > 0"),
    ("negative lr", lambda w, a: a + ["--learning_rate=-1e-4"], "learning_rate: must be > 0"),
    ("zero checkpoint limit", lambda w, a: a + ["--checkpoints_total_limit", "0"], "checkpoints_total_limit"),
    ("batch 1 with SADM", lambda w, a: replace(a, "--train_batch_size", "1"), "no pairs"),
    ("resolution the model cannot take", lambda w, a: a + ["--resolution", "36"], "resolution: 36 is not divisible"),
    ("class id out of range", lambda w, a: replace(replace(a, "--train_data_dir", None), "--dataset_name",
                                                   str(w["big_labels"])), "class id 5000 is out of range"),
    ("unknown tracker", lambda w, a: replace(a, "--report_to", "myspace"), "report_to: unknown tracker"),
    ("missing resume checkpoint", lambda w, a: a + ["--resume_from_checkpoint", str(w["root"] / "ckpt")],
     "resume_from_checkpoint:"),
    ("non-empty output_dir", lambda w, a: replace(a, "--output_dir", str(w["busy"])), "--overwrite_output_dir"),
    ("push without repo id", lambda w, a: a + ["--push_to_hub"], "hub_model_id: is required"),
    ("unusable repo id", lambda w, a: a + ["--push_to_hub", "--hub_model_id", "a/b/c d"], "hub_model_id:"),
    ("data smaller than a batch", lambda w, a: replace(a, "--train_batch_size", "64"), "fewer than one global batch"),
    ("unreachable Hub model offline", lambda w, a: replace(a, "--pretrained", "someone/missing-model"),
     "someone/missing-model is not in the local Hugging Face cache"),
    ("missing image column", lambda w, a: replace(replace(a, "--train_data_dir", None), "--dataset_name",
                                                  str(w["big_labels"])) + ["--image_column", "img"], "image_column:"),
]


@pytest.mark.parametrize("name, mutate, expected", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_clear_line(world, tmp_path, capsys, name, mutate, expected):
    args = mutate(world, ok_args(world, tmp_path / "out"))
    assert main(args) == 2
    captured = capsys.readouterr().err
    assert "Traceback" not in captured
    lines = [line for line in captured.splitlines() if "sadm-train: error:" in line]
    assert len(lines) == 1, captured
    err = lines[0][lines[0].index("sadm-train: error:"):]  # a library's progress bar may share the line
    assert expected in err, err


def test_nothing_the_user_had_is_touched(world, tmp_path, capsys):
    assert main(replace(ok_args(world, tmp_path), "--output_dir", str(world["busy"]))) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert sorted(p.name for p in world["busy"].iterdir()) == ["mine.txt"]
    assert (world["busy"] / "mine.txt").read_text() == "keep me"


def test_the_table_holds_distinct_errors_of_a_working_run(world, tmp_path, capsys):
    """Each case must be an error of its own mutation: the unmutated arguments train (exit 0), every case
    changes them, and no two cases share a name or expect the same message (a copy-pasted case tests nothing)."""
    assert len(CASES) >= 20
    assert len({name for name, _, _ in CASES}) == len(CASES)
    assert len({expected for _, _, expected in CASES}) == len(CASES)
    base = ok_args(world, tmp_path / "out")
    assert all(mutate(world, base) != base for _, mutate, _ in CASES)
    assert main(base) == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "out" / "model_index.json").is_file()


def test_an_unsupported_pipeline_class_names_every_supported_one():
    from sadm_finetune.utils.errors import InputError
    from sadm_finetune.families.loading import _adapter_class

    with pytest.raises(InputError) as e:
        _adapter_class("SanaPipeline", "Efficient-Large-Model/Sana_1600M_1024px_diffusers")
    message = str(e.value)
    assert "\n" not in message and "SanaPipeline, which this toolkit cannot fine-tune" in message
    for supported in ("DiTPipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline",
                      "StableDiffusion3Pipeline", "PixArtSigmaPipeline", "FluxPipeline", "QwenImagePipeline"):
        assert supported in message.split("use one of:")[1]


def test_a_run_stopped_by_bad_data_before_training_does_not_block_its_corrected_rerun(world, tmp_path, capsys, caplog):
    """An unreadable image met in the first batch stops the run after it has started writing (training_config.yaml,
    logs/); the corrected rerun goes into the same folder without --overwrite_output_dir, and says so. With a file
    of the user's beside those leftovers the folder is still refused, and nothing in it is touched."""
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    bad = sorted((data / "cat").glob("*.png"))[0]
    good = bad.read_bytes()
    bad.write_bytes(good[:60])  # a truncated PNG: its header reads, its pixels do not
    out = tmp_path / "out"
    args = replace(replace(ok_args(world, out), "--train_data_dir", str(data)), "--report_to", "tensorboard")
    args = replace(args, "--train_batch_size", "6")  # the whole data set in the first batch
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and bad.name in err, err[-2000:]
    leftovers = sorted(p.name for p in out.iterdir())
    assert {"training_config.yaml", "logs"} <= set(leftovers), leftovers

    mine = tmp_path / "mine"  # the same leftovers beside a file of the user's: refused, untouched
    shutil.copytree(out, mine)
    (mine / "notes.txt").write_text("keep me")
    assert main(replace(args, "--output_dir", str(mine))) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == sorted([*leftovers, "notes.txt"])
    assert (mine / "notes.txt").read_text() == "keep me"

    bad.write_bytes(good)  # the fix, then the same command
    caplog.clear()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert f"output_dir: {out} holds only what a run that stopped before its first update left" in captured.out
    # The default D is large beside this tiny DiT: a fact of the run summary, not a warning with a "[RANK 0]" prefix.
    assert "% of the denoiser; --disc_width / --disc_depth set its size)" in captured.out
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("sadm_finetune")]
    assert not [m for m in ours if "[RANK" in m or "structure discriminator has" in m], ours
    assert (out / "model_index.json").is_file()
    from sadm_finetune.train.output_dir import MARKER

    assert not (out / MARKER).exists()  # a trained folder is protected again: the next run is refused
    assert main(args) == 2 and "--overwrite_output_dir" in capsys.readouterr().err
