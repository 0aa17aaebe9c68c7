"""Run the trainer the way users do: `accelerate launch train_sadm.py ...` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_HOME": str(tmp_path / "hf_home"), "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"})
    env.update(extra)
    return env


def accelerate_launch(args: list[str], env: dict[str, str], num_processes: int = 1,
                      timeout: int = 300, quiet: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    if quiet:  # accelerate re-raises a child's non-zero exit as its own traceback unless --quiet
        launcher += ["--quiet"]
    if num_processes > 1:
        launcher += ["--multi_gpu"]  # with ACCELERATE_USE_CPU=1: several CPU processes over gloo
    cmd = [*launcher, str(ROOT / "train_sadm.py"), *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def tiny_run_args(pretrained: Path, data: Path, out: Path, steps: int = 4) -> list[str]:
    return ["--pretrained", str(pretrained), "--train_data_dir", str(data), "--output_dir", str(out),
            "--max_train_steps", str(steps), "--train_batch_size", "4", "--learning_rate", "1e-3",
            "--structure_warmup_steps", "0", "--disc_width", "8", "--disc_depth", "2", "--disc_embed_dim", "16",
            "--num_validation_images", "1", "--validation_inference_steps", "2", "--report_to", "tensorboard"]
