"""sadm-eval end to end on a tiny DiT pipeline built in code, and its one-line errors for bad input."""

import json
import math
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="sadm-tests-hf-home-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_pipelines import build_tiny_dit_pipeline  # noqa: E402

from sadm_finetune.data.digits import load_digits_images  # noqa: E402
from sadm_finetune.evaluation.evaluate import EvalConfig, main, open_reference  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    return build_tiny_dit_pipeline(tmp_path_factory.mktemp("tiny-dit") / "pipe")


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """An ImageNet-style folder: subfolders 0..9, three 32x32 digit PNGs each."""
    root = tmp_path_factory.mktemp("digits-ref")
    images, labels = load_digits_images(32)
    for label in range(10):
        (root / str(label)).mkdir()
        for i, index in enumerate(np.flatnonzero(labels == label)[:3]):
            Image.fromarray(images[index]).save(root / str(label) / f"{i}.png")
    return root


def _card(folder):
    from huggingface_hub import ModelCard, ModelCardData

    folder.mkdir(parents=True, exist_ok=True)
    content = f"---\n{ModelCardData(library_name='diffusers', tags=['sadm']).to_yaml()}\n---\n\n# tiny\n"
    ModelCard(content).save(folder / "README.md")
    return folder


def test_sadm_eval_end_to_end(tiny_dit, digits_dir, tmp_path, capsys):
    from huggingface_hub import ModelCard

    card_dir = _card(tmp_path / "card")
    out_json, grid, cache = tmp_path / "eval.json", tmp_path / "grid.png", tmp_path / "ref.npz"
    argv = ["--pipeline", str(tiny_dit), "--reference_dir", str(digits_dir), "--features", "digits",
            "--classifier", "digits", "--samples_per_class", "2", "--num_inference_steps", "2",
            "--batch_size", "8", "--seed", "3", "--device", "cpu", "--output_json", str(out_json),
            "--reference_stats_cache", str(cache), "--update_model_card", str(card_dir)]
    base = tmp_path / "base-pipe"  # the same weights under another name: the grid's labels tell them apart
    shutil.copytree(tiny_dit, base)
    assert main([*argv, "--grid", str(grid), "--compare_with", str(base)]) == 0

    result = json.loads(out_json.read_text())
    metrics = result["metrics"]
    # these at least (another metric may join them)
    assert {"fid", "kid_mean", "kid_std", "precision", "recall", "label_accuracy"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["label_accuracy"] <= 1
    assert (result["num_samples"], result["num_classes"], result["num_reference_images"]) == (20, 10, 30)
    assert (result["num_inference_steps"], result["guidance_scale"], result["seed"]) == (2, 1.0, 3)
    # Same pipeline, same seeds and labels: the comparison column must be identical.
    assert result["compare_with"]["metrics"] == metrics
    # The structure probe by noise level (no structure_discriminator/ in this folder: no D column).
    assert result["probe"]["timesteps"] == [100, 300, 500, 700, 900] and result["probe"]["d_pair_cos"] is None
    assert all(v >= 0 for v in result["probe"]["structure_gap_fixed"]) and result["compare_with"]["probe"] == result["probe"]

    with Image.open(grid) as image:  # 10 class rows; 2 base + gap + 2 tuned columns of 32x32 tiles, labelled
        pixels = np.asarray(image.convert("RGB"))
    band = pixels.shape[0] - 10 * 32
    assert pixels.shape[1] == 5 * 32 and 8 <= band <= 40, pixels.shape  # taller than the unlabelled grid
    tiles = pixels[band:]
    np.testing.assert_array_equal(tiles[:, :64], tiles[:, 96:])  # same pipeline, same seeds: same samples
    assert (tiles[:, 64:96] == 255).all()  # the white gap column
    for columns in (slice(0, 64), slice(96, 160)):  # a label above each side: dark text on the white band
        assert (pixels[:band, columns] < 128).any()
    assert (pixels[:band, 64:96] == 255).all()

    printed = capsys.readouterr().out
    assert "| FID |" in printed and "| label accuracy |" in printed and "20 samples" in printed

    card = ModelCard.load(card_dir / "README.md")
    by_type = {r.metric_type: r for r in card.data.eval_results}
    assert set(by_type) == {"fid", "kid", "precision", "recall", "label_accuracy"}
    assert by_type["fid"].metric_value == pytest.approx(metrics["fid"], rel=1e-5)
    assert by_type["fid"].metric_args["num_inference_steps"] == 2
    assert "model-index" in (card_dir / "README.md").read_text()

    # A second run with the same settings gives the same numbers, reads the reference features from
    # the cache, and replaces the card's entries instead of piling them up.
    mtime = cache.stat().st_mtime_ns
    assert main(argv) == 0
    assert len(ModelCard.load(card_dir / "README.md").data.eval_results) == 5
    assert cache.stat().st_mtime_ns == mtime
    assert json.loads(out_json.read_text())["metrics"] == metrics

    # A cache made with other settings is refused with a one-line error, not silently reused.
    capsys.readouterr()
    assert main([*argv, "--max_reference_images", "12", "--samples_per_class", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sadm-eval: error: --reference_stats_cache:") and "max_images=12" in err


def test_text_to_image_pipeline_is_prompted_with_class_names(digits_dir, tmp_path):
    from tiny_sd import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(tmp_path / "sd")
    out_json = tmp_path / "eval.json"
    assert main(["--pipeline", str(pipe), "--reference_dir", str(digits_dir), "--features", "digits",
                 "--prompt_template", "a handwritten digit {label}", "--samples_per_class", "1",
                 "--num_inference_steps", "2", "--device", "cpu", "--output_json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["conditioning"] == "prompt" and result["num_samples"] == 10
    assert all(math.isfinite(v) for v in result["metrics"].values())


def test_reference_dataset_from_a_local_parquet_folder(tmp_path):
    import datasets

    images, labels = load_digits_images(16)
    names = [str(i) for i in range(10)]
    features = datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(x) for x in images[:12]], "digit": labels[:12]}, features)
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "train.parquet"))

    config = EvalConfig(pipeline="unused", reference_dataset=str(tmp_path), image_column="img", label_column="digit")
    reference = open_reference(config)
    assert reference.num_images == 12 and reference.label_names[3] == "3"
    np.testing.assert_array_equal(reference.labels, labels[:12])
    pixels = reference.load(np.array([0, 5]), 32)
    assert pixels.shape == (2, 32, 32, 3) and pixels.dtype == np.uint8


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--reference_dir", "/no/such/folder"], "--reference_dir"),
        (["--reference_dir", "EMPTY"], "--reference_dir"),
        (["--reference_dataset", "builtin:digits", "--features", "resnet"], "--features"),
        (["--reference_dataset", "builtin:digits", "--features", "inception"], "--features"),
        (["--reference_dataset", "builtin:digits", "--samples_per_class", "0"], "--samples_per_class"),
        (["--reference_dataset", "builtin:digits", "--reference_dir", "x"], "--reference_dir"),
        (["--reference_dataset", "builtin:digits", "--update_model_card", "EMPTY"], "--update_model_card"),
        (["--reference_dataset", "builtin:digits", "--features", "digits", "--classifier", "EMPTY"], "--classifier"),
        (["--reference_dataset", "builtin:digits", "--features", "digits", "--pipeline", "/no/such/pipe"],
         "--pipeline"),
        (["--reference_dataset", "builtin:digits", "--num_inference_steps", "many"], "arguments"),
        (["--reference_dataset", "builtin:digits", "--prompt_template", "a {digit}"], "--prompt_template"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(args, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights there
    monkeypatch.delenv("SADM_INCEPTION_PATH", raising=False)
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    pipeline = [] if "--pipeline" in args else ["--pipeline", str(tmp_path / "never-loaded")]
    assert main([*pipeline, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sadm-eval: error: {flag}") and "\n" not in err
    assert ";" in err  # the problem, then the fix


def test_missing_inception_weights_say_where_to_put_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("SADM_INCEPTION_PATH", raising=False)
    assert main(["--pipeline", "p", "--reference_dataset", "builtin:digits", "--features", "inception"]) == 2
    err = capsys.readouterr().err
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "inception-2015-12-05.pt"
    assert str(expected) in err and "inception-2015-12-05.pt (needs network" in err and "SADM_INCEPTION_PATH" in err


def test_only_the_classes_of_a_labelled_reference_are_sampled(tiny_dit, tmp_path):
    """A transfer domain's reference (digits 5-9) is compared with samples of those classes only."""
    import json

    root = tmp_path / "ref"
    images, labels = load_digits_images(32)
    for label in (3, 7):
        (root / f"{label}").mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(labels == label)[:3]):
            Image.fromarray(images[index]).save(root / f"{label}" / f"{i}.png")
    # sorted folder names give ids 0 and 1: classes 0, 1 of the 10-class pipeline
    out_json = tmp_path / "eval.json"
    assert main(["--pipeline", str(tiny_dit), "--reference_dir", str(root), "--features", "digits",
                 "--samples_per_class", "2", "--num_inference_steps", "1", "--batch_size", "4", "--device", "cpu",
                 "--output_json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["num_classes"] == 2 and result["num_samples"] == 4


def test_a_second_sampler_gives_other_samples_reproducibly(tiny_dit, digits_dir, tmp_path):
    """--sampler ddpm swaps the scheduler (same betas); it is reproducible under its seed and differs from the
    pipeline's own DDIM, so an evaluation spread across samplers is real."""
    from sadm_finetune.evaluation.evaluate import evaluate_pipeline

    def fid(sampler, seed=3):
        config = EvalConfig(pipeline=str(tiny_dit), reference_dir=str(digits_dir), features="digits",
                            samples_per_class=2, num_inference_steps=3, batch_size=10, seed=seed, device="cpu",
                            sampler=sampler, probe_images=0, output_json=str(tmp_path / f"{sampler}-{seed}.json"))
        result = evaluate_pipeline(config)
        assert json.loads((tmp_path / f"{sampler}-{seed}.json").read_text())["sampler"] == sampler
        return result["metrics"]["fid"]

    own, ddpm = fid("pipeline"), fid("ddpm")
    assert own != ddpm and fid("ddpm") == ddpm
    assert fid("ddpm", seed=4) != ddpm
    # Euler needs first latents scaled by init_noise_sigma, which DiTPipeline never does: refused in one line
    from sadm_finetune.utils.errors import InputError

    with pytest.raises(InputError, match="^--sampler: euler .* use --sampler ddpm"):
        fid("euler")


def test_the_paper_protocol_script_runs_the_evaluation_it_describes(tiny_dit, digits_dir, tmp_path):
    """benchmarks/paper_eval.py at toy size: N samples over the classes, DDPM sampler, guidance, its JSON."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "paper_eval.py"
    spec = importlib.util.spec_from_file_location("paper_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "paper.json"
    assert module.main(["--pipeline", str(tiny_dit), "--reference_dir", str(digits_dir), "--num_samples", "20",
                        "--num_classes", "10", "--steps", "2", "--batch_size", "10", "--dtype", "float32",
                        "--features", "digits", "--output_json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_samples"] == 20 and result["sampler"] == "ddpm" and result["num_inference_steps"] == 2
    assert result["guidance_scale"] == 1.5 and math.isfinite(result["metrics"]["fid"])
    assert module.analytic_hours(50_000, 250, True) == pytest.approx(2.08, abs=0.05)
