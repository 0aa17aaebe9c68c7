"""End to end: tiny DiT pipelines on a tiny image folder, through the CLI entry point in process (the README's
`accelerate launch` command itself runs in test_demo_recipe.py; the refusal below goes through it too)."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from launch import accelerate_launch, offline_env, tiny_run_args, train_in_process
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

pytestmark = pytest.mark.slow

CASES = {"learned-sigma-sadm": (True, "0.05"), "plain": (False, "0")}  # learned_sigma, structure_weight


def _tensors(folder):
    return load_file(str(next(folder.glob("*.safetensors"))))


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory):
    """Each case fine-tuned once (the tests below read the files)."""
    tmp = tmp_path_factory.mktemp("train_dit")
    data = build_image_folder(tmp / "data", classes=("cat", "dog"), per_class=4)
    runs = {}
    for name, (learned_sigma, structure_weight) in CASES.items():
        base = build_tiny_dit_pipeline(tmp / name / "base", learned_sigma=learned_sigma, num_classes=2)
        out = tmp / name / "out"
        args = tiny_run_args(base, data, out) + ["--structure_weight", structure_weight]
        runs[name] = SimpleNamespace(base=base, out=out, proc=train_in_process(args), structure_weight=structure_weight)
    return runs


@pytest.mark.parametrize("case", CASES)
def test_fine_tune_exports_a_stock_pipeline(fine_tunes, stock_diffusers, case):
    run = fine_tunes[case]
    base, out, proc, structure_weight = run.base, run.out, run.proc, run.structure_weight
    assert proc.returncode == 0, proc.stderr[-3000:]

    for name in ("model_index.json", "README.md", "training_config.yaml", "samples/final.png",
                 "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DiTPipeline"
    resolved = yaml.safe_load((out / "training_config.yaml").read_text())
    assert resolved["sadm"]["structure_weight"] == float(structure_weight)
    assert list((out / "logs").rglob("events.out.tfevents*"))

    # Stock diffusers, in a process that never imports sadm_finetune, loads and samples it.
    assert stock_diffusers.load(out, class_labels=[0, 1]) == {
        "cls": "DiTPipeline", "shape": [2, 32, 32, 3], "finite": True, "labels": {"class_0": 0, "class_1": 1},
        "sadm_finetune_imported": False}

    # The VAE is frozen: its tensors are copied, never computed, so bit-identical to the base; the
    # transformer did train (by more than rounding: 4 AdamW steps at lr 1e-3 move weights by ~1e-3).
    base_vae, new_vae = _tensors(base / "vae"), _tensors(out / "vae")
    assert base_vae.keys() == new_vae.keys() and all(torch.equal(base_vae[k], new_vae[k]) for k in base_vae)
    base_tr, new_tr = _tensors(base / "transformer"), _tensors(out / "transformer")
    assert base_tr.keys() == new_tr.keys()
    assert max((base_tr[k].float() - new_tr[k].float()).abs().max().item() for k in base_tr) > 1e-4

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "diffusers" and "sadm" in meta["tags"] and "dit" in meta["tags"]
    assert ("accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no "
            "train_sadm.py") in card
    assert "structure_weight" in card

    if structure_weight == "0":
        assert not (out / "structure_discriminator").exists()
        assert "plain fine-tune" in card
    else:
        assert (out / "structure_discriminator" / "config.json").is_file()
        from sadm_finetune.terms.sadm.discriminator import StructureDiscriminator

        disc = StructureDiscriminator.from_pretrained(out / "structure_discriminator", use_safetensors=True)
        assert disc.config.base_channels == 8


def test_refuses_to_clobber_a_non_empty_output_dir(tmp_path):
    base = build_tiny_dit_pipeline(tmp_path / "base")
    data = build_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    proc = accelerate_launch(tiny_run_args(base, data, out), offline_env(tmp_path), quiet=True)
    assert proc.returncode != 0
    assert "output_dir" in proc.stderr and "--overwrite_output_dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "precious.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_push_to_hub_reaches_the_loopback_server_and_never_writes_the_token(tmp_path, fake_hub):
    from hub_server import scan_for_secret

    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    # In process: the fixture points this process's huggingface_hub at the fake Hub and puts the token in HF_TOKEN.
    proc = train_in_process(tiny_run_args(base, data, out, steps=2) + ["--push_to_hub", "--hub_model_id",
                                                                       "org/sadm-tiny"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = fake_hub.repo_files("org/sadm-tiny")
    assert "model_index.json" in stored and "transformer/diffusion_pytorch_model.safetensors" in stored
    assert "README.md" in stored and not any(p.startswith("checkpoints/") for p in stored)
    assert stored["model_index.json"] == (out / "model_index.json").read_bytes()
    assert all(r.authorization == f"Bearer {fake_hub.token}" for r in fake_hub.requests
               if "/api/models/" in r.path or "/api/repos/" in r.path)
    assert scan_for_secret(out, fake_hub.token, [proc.stdout, proc.stderr]) == []
