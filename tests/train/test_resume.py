"""Checkpoints: exact resume, rotation, atomic writes, preemption by signal.

Runs go through `sadm_finetune.cli.main` in this process (tests/launch.py `train_in_process`), each resumed
run reading its checkpoint from disk; the signal tests need a process to signal and stay subprocesses. A
resume in a fresh set of processes is tested by test_fsdp.py."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from launch import ROOT, offline_env, tiny_run_args, train_in_process
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline
from checkpoint_weights import _max_diff, _resumed_step, _weights


pytestmark = pytest.mark.slow


def _nudge_checkpoint(folder, lora):
    """Add NUDGE to one element of one trained weight inside the checkpoint's safetensors; return its key."""
    path = folder / "model.safetensors"
    weights = load_file(str(path))
    if lora:
        key = next(k for k in sorted(weights) if "lora_B" in k)
    else:
        key = next(k for k in sorted(weights) if k.endswith("proj_out_2.weight"))
    weights[key][0, 0] += NUDGE
    save_file(weights, str(path))
    return key


NUDGE = 0.5


@pytest.mark.parametrize("lora, ema, optimizer", [(False, True, None), (True, True, None), (False, False, None),
                                                  (True, False, None), (False, False, "prodigy"),
                                                  (False, False, "adamw_8bit")],
                         ids=["full-ema", "lora-ema", "full", "lora", "full-prodigy", "full-adamw_8bit"])
def test_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch, lora, ema, optimizer):
    from sadm_finetune.diffusion.process import DDPMProcess

    draws = []  # per micro-batch: what the loop noised (batch latents, noise, timesteps), in order
    add_noise = DDPMProcess.add_noise

    def recorded(self, latents, noise, timesteps):
        draws.append((latents.double().sum().item(), noise.double().sum().item(), timesteps.tolist()))
        return add_noise(self, latents, noise, timesteps)

    monkeypatch.setattr(DDPMProcess, "add_noise", recorded)
    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data", per_class=5)  # 10 images, batch 4: epochs of 2 steps
    extra = ["--checkpointing_steps", "3", "--lr_scheduler", "cosine", "--random_flip", "--disc_weight_decay", "0.01",
             "--report_to", "none"]
    extra += ["--use_ema", "--ema_decay", "0.9"] if ema else ["--no_use_ema"]
    if lora:
        extra += ["--trainable", "lora", "--lora_rank", "4", "--learning_rate", "1e-2"]
    if optimizer:  # both optimizers' state (Prodigy's step-size estimate d sits in its param groups) must resume
        extra += ["--optimizer", optimizer, "--disc_optimizer", optimizer]
    if optimizer == "prodigy":
        extra += ["--learning_rate", "1.0", "--disc_learning_rate", "1.0", "--prodigy_d_coef", "100"]
    full = tmp_path / "full"
    proc = train_in_process(tiny_run_args(base, data, full, steps=7) + extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    uninterrupted, draws[:] = list(draws), []
    assert len(uninterrupted) == 7
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    ckpt = full / "checkpoints" / "checkpoint-3"
    # The project's state is JSON / safetensors; the only pickles are accelerate's (docs/checkpoints.md).
    assert json.loads((ckpt / "train_state.json").read_text())["global_step"] == 3
    assert (ckpt / "ema.safetensors").is_file() == ema
    assert not list(ckpt.glob("custom_checkpoint_*"))

    # A second run that only has the step-3 checkpoint of the same command resumes from it.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, resumed / "checkpoints" / "checkpoint-3")
    proc = train_in_process(tiny_run_args(base, data, resumed, steps=7) + extra +
                            ["--resume_from_checkpoint", "latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _resumed_step(proc.stdout + proc.stderr) == 3  # not a silent restart from step 0
    # ... at the right batch: its micro-batches (data, noise, timesteps) are the uninterrupted run's from step 4 on
    assert draws == uninterrupted[3:]
    assert _max_diff(_weights(full / "transformer"), _weights(resumed / "transformer")) <= 1e-6
    assert _max_diff(_weights(full / "structure_discriminator"), _weights(resumed / "structure_discriminator")) <= 1e-6
    # Prodigy's first steps are small (its step size d grows from d0 = 1e-6), so its run moves less in 7 steps.
    moved = 1e-5 if optimizer == "prodigy" else 1e-4
    assert _max_diff(_weights(base / "transformer"), _weights(full / "transformer")) > moved
    if optimizer == "prodigy":  # the checkpoint holds the grown estimate, which the resume above continued from
        import torch

        assert torch.load(ckpt / "optimizer.bin", weights_only=True)["param_groups"][0]["d"] > 1e-5
    if lora:
        lora_full = load_file(str(full / "pytorch_lora_weights.safetensors"))
        lora_resumed = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
        assert _max_diff(lora_full, lora_resumed) <= 1e-6
    if not ema:
        return

    # ... and it continued from the checkpoint's weights: a nudge written into the checkpoint's safetensors
    # shows up in the result (a restart from the base, which the seeded noise would replay, would not show it).
    nudged = tmp_path / "nudged"
    (nudged / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, nudged / "checkpoints" / "checkpoint-3")
    key = _nudge_checkpoint(nudged / "checkpoints" / "checkpoint-3", lora)
    proc = train_in_process(tiny_run_args(base, data, nudged, steps=7) + extra +
                            ["--resume_from_checkpoint", "latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _resumed_step(proc.stdout + proc.stderr) == 3
    if lora:  # the exported adapter file (EMA weights), keys without peft's adapter name
        a, b = (load_file(str(f / "pytorch_lora_weights.safetensors")) for f in (resumed, nudged))
        (key,) = [k for k in a if k.endswith(key.replace(".default", ""))]
    else:
        a, b = _weights(resumed / "transformer"), _weights(nudged / "transformer")
    # 4 more steps move a weight by ~lr each, far less than the nudge; the EMA (warm-up decay <= 0.47 at
    # these steps) keeps nearly all of it.
    shift = (b[key][0, 0] - a[key][0, 0]).item()
    assert 0.5 * NUDGE < shift < 1.5 * NUDGE, shift


def test_checkpoint_rotation_and_missing_resume_checkpoint(tmp_path):
    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=5) + ["--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
                                                      "--report_to", "none", "--structure_weight", "0"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]

    proc = train_in_process(args + ["--resume_from_checkpoint", "checkpoint-77"])
    assert proc.returncode == 2 and "resume_from_checkpoint: checkpoint-77 not found" in proc.stderr


def test_interrupted_checkpoint_write_is_never_picked_up(tmp_path):
    from sadm_finetune.train.checkpointing import list_checkpoints, resolve_resume

    root = tmp_path / "checkpoints"
    (root / "checkpoint-2").mkdir(parents=True)
    (root / ".tmp-checkpoint-4").mkdir()  # a kill -9 during save_state leaves only this
    (root / "checkpoint-10").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-10"
    assert resolve_resume(tmp_path / "elsewhere", "latest") is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_checkpoints_and_exits_cleanly(tmp_path, signum):
    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    # No periodic checkpoints: the one checkpoint must come from the signal. Validation every step only
    # tells the test that training is under way.
    cmd = [sys.executable, str(ROOT / "train_sadm.py"), *tiny_run_args(base, data, out, steps=100000),
           "--report_to", "none", "--validation_steps", "1"]
    proc = subprocess.Popen(cmd, env=offline_env(tmp_path), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "samples" / "step-1.png").exists() and proc.poll() is None:
            time.sleep(0.2)
        assert (out / "samples" / "step-1.png").exists(), "training never reached step 1"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    stopped = re.findall(r"Stopped by signal at step (\d+); checkpoint saved", stdout + stderr)
    assert len(stopped) == 1 and "--resume_from_checkpoint latest" in stdout + stderr
    step = int(stopped[0])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"checkpoint-{step}"]
    state = json.loads((out / "checkpoints" / f"checkpoint-{step}" / "train_state.json").read_text())
    assert state["global_step"] == step >= 1
    assert not (out / "model_index.json").exists()  # stopped early: no export of a half-trained model


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(proc):
    lines = [ln for ln in proc.stderr.splitlines() if "sadm-train: error:" in ln]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_latest_without_a_checkpoint_never_overwrites_a_finished_run(tmp_path):
    """The reported data loss: a finished run without checkpoints, then the suggested
    `--resume_from_checkpoint latest` retrained from step 0 over the export, exit 0."""
    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=2) + ["--report_to", "none"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model_index.json").is_file() and not (out / "checkpoints").exists()
    before = _snapshot(out)

    # Occupied folder, no checkpoint: the error does not suggest resuming.
    line = _error_line(train_in_process(args))
    assert "--overwrite_output_dir" in line and "--resume_from_checkpoint" not in line

    line = _error_line(train_in_process(args + ["--resume_from_checkpoint", "latest"]))
    assert "no checkpoint found" in line and "--overwrite_output_dir" in line
    assert _snapshot(out) == before  # the export is untouched, byte for byte


def test_latest_on_an_empty_or_missing_folder_starts_fresh_and_checkpoints_are_suggested(tmp_path):
    from sadm_finetune.config.run import build_config
    from sadm_finetune.utils.errors import InputError
    from sadm_finetune.train.entry import check_output_dir

    def config(out, **extra):
        return build_config({"pretrained_model_name_or_path": "p", "train_data_dir": "d", "output_dir": str(out),
                             **extra})

    assert check_output_dir(config(tmp_path / "missing", resume_from_checkpoint="latest")) == tmp_path / "missing"
    (tmp_path / "empty").mkdir()
    assert check_output_dir(config(tmp_path / "empty", resume_from_checkpoint="latest")) == tmp_path / "empty"
    busy = tmp_path / "busy"
    (busy / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (busy / "training_config.yaml").write_text("x")
    with pytest.raises(InputError, match="--resume_from_checkpoint latest to continue it"):
        check_output_dir(config(busy))
    assert check_output_dir(config(busy, resume_from_checkpoint="latest")) == busy
    (busy / "checkpoints" / "checkpoint-5").rmdir()
    with pytest.raises(InputError, match="no checkpoint found in .*checkpoints, so there is nothing to resume"):
        check_output_dir(config(busy, resume_from_checkpoint="latest"))
    assert check_output_dir(config(busy, resume_from_checkpoint="latest", overwrite_output_dir=True)) == busy
