"""Checkpoints: exact resume, rotation, atomic writes, preemption by signal."""

import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from launch import ROOT, accelerate_launch, offline_env, tiny_run_args
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

pytestmark = pytest.mark.slow


def _weights(folder):
    return load_file(str(next(folder.glob("*.safetensors"))))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resumed_run_ends_with_the_same_weights(tmp_path, lora):
    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data", per_class=5)  # 10 images, batch 4: epochs of 2 steps
    env = offline_env(tmp_path)
    extra = ["--checkpointing_steps", "3", "--lr_scheduler", "cosine", "--use_ema", "--ema_decay", "0.9",
             "--random_flip", "--disc_weight_decay", "0.01", "--report_to", "none"]
    if lora:
        extra += ["--trainable", "lora", "--lora_rank", "4", "--learning_rate", "1e-2"]
    full = tmp_path / "full"
    proc = accelerate_launch(tiny_run_args(base, data, full, steps=7) + extra, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]

    # A second run that only has the step-3 checkpoint of the same command resumes from it.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    proc = accelerate_launch(tiny_run_args(base, data, resumed, steps=7) + extra +
                             ["--resume_from_checkpoint", "latest"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resumed from" in proc.stdout + proc.stderr
    assert _max_diff(_weights(full / "transformer"), _weights(resumed / "transformer")) <= 1e-6
    assert _max_diff(_weights(full / "structure_discriminator"), _weights(resumed / "structure_discriminator")) <= 1e-6
    # ... and it really started at step 3: the first run's state differs from the base by then.
    assert _max_diff(_weights(base / "transformer"), _weights(full / "transformer")) > 1e-4
    if lora:
        lora_full = load_file(str(full / "pytorch_lora_weights.safetensors"))
        lora_resumed = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
        assert _max_diff(lora_full, lora_resumed) <= 1e-6


def test_checkpoint_rotation_and_missing_resume_checkpoint(tmp_path):
    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=5) + ["--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
                                                      "--report_to", "none", "--structure_weight", "0"]
    proc = accelerate_launch(args, offline_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]

    proc = accelerate_launch(args + ["--resume_from_checkpoint", "checkpoint-77"], offline_env(tmp_path), quiet=True)
    assert proc.returncode != 0 and "resume_from_checkpoint: checkpoint-77 not found" in proc.stderr


def test_interrupted_checkpoint_write_is_never_picked_up(tmp_path):
    from sadm_finetune.checkpointing import list_checkpoints, resolve_resume

    root = tmp_path / "checkpoints"
    (root / "checkpoint-2").mkdir(parents=True)
    (root / ".tmp-checkpoint-4").mkdir()  # a kill -9 during save_state leaves only this
    (root / "checkpoint-10").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-10"
    assert resolve_resume(tmp_path / "elsewhere", "latest") is None


def test_sigterm_finishes_the_step_checkpoints_and_exits_cleanly(tmp_path):
    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "train_sadm.py"), *tiny_run_args(base, data, out, steps=100000),
           "--report_to", "none", "--checkpointing_steps", "2"]
    proc = subprocess.Popen(cmd, env=offline_env(tmp_path), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "checkpoint-2").exists():
        time.sleep(0.2)
    assert (out / "checkpoints" / "checkpoint-2").exists(), "training never reached step 2"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "--resume_from_checkpoint latest" in stdout + stderr
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir() if p.name.startswith("checkp"))
    assert steps[-1] >= 2 and not list((out / "checkpoints").glob(".tmp-*"))
    assert not (out / "model_index.json").exists()  # stopped early: no export of a half-trained model
