"""Run the trainer the way users do (`accelerate launch train_sadm.py ...` in a subprocess), or in this
process through the same CLI entry point when the test needs no process boundary."""

from __future__ import annotations

import contextlib
import io
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


def launch_command(args: list[str], num_processes: int = 1, quiet: bool = False) -> list[str]:
    """`accelerate launch [options] train_sadm.py ARGS` as this interpreter runs it."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    if quiet:  # accelerate re-raises a child's non-zero exit as its own traceback unless --quiet
        launcher += ["--quiet"]
    if num_processes > 1:
        launcher += ["--multi_gpu"]  # with ACCELERATE_USE_CPU=1: several CPU processes over gloo
    return [*launcher, str(ROOT / "train_sadm.py"), *args]


def accelerate_launch(args: list[str], env: dict[str, str], num_processes: int = 1,
                      timeout: int = 300, quiet: bool = False) -> subprocess.CompletedProcess:
    cmd = launch_command(args, num_processes, quiet)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def accelerate_launch_together(runs: list[tuple[list[str], dict[str, str]]],
                               timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Several one-process `accelerate_launch` runs (ARGS, env) started at once, each its own launcher and child;
    returns their results in order. A tiny run's time is mostly its two interpreters importing torch, diffusers and
    transformers, single-threaded (OMP_NUM_THREADS=1): side by side, those of two runs overlap on a 2-core
    machine. Output goes through files, so no run blocks on a full pipe while another is waited for."""
    import tempfile
    import time

    with contextlib.ExitStack() as stack:
        started = []
        for args, env in runs:
            out, err = (stack.enter_context(tempfile.TemporaryFile(mode="w+")) for _ in range(2))
            cmd = launch_command(args)
            started.append((cmd, subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=err, text=True,
                                                  start_new_session=True), out, err))
        deadline, results = time.monotonic() + timeout, []
        try:
            for cmd, proc, out, err in started:
                code = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
                out.seek(0)
                err.seek(0)
                results.append(subprocess.CompletedProcess(cmd, code, out.read(), err.read()))
        finally:
            for _, proc, _, _ in started:
                if proc.poll() is None:  # a run past the deadline: stopped with its child, not left running
                    import signal

                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the launcher and the trainer it started
                    proc.wait()
    return results


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons (as accelerate's own AccelerateTestCase does after each test)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@contextlib.contextmanager
def _captured(stdout: io.StringIO, stderr: io.StringIO):
    """sys.stdout / sys.stderr into the buffers, and with them every logging handler that writes to the streams
    (diffusers, transformers and huggingface_hub bind theirs to sys.stderr once, on import): what the run prints
    is what a subprocess's pipes would hold. Handlers created during the run are pointed back afterwards."""
    import logging

    def stream_handlers():
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        return [h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                and not isinstance(getattr(type(h), "stream", None), property)]  # lastResort follows sys.stderr

    outer = {id(sys.stdout): stdout, id(sys.__stdout__): stdout, id(sys.stderr): stderr, id(sys.__stderr__): stderr}
    back = {id(stdout): sys.stdout, id(stderr): sys.stderr}
    moved = [(h, h.stream) for h in stream_handlers() if id(h.stream) in outer]
    for handler, stream in moved:
        handler.setStream(outer[id(stream)])
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            yield
    finally:
        for handler, stream in moved:
            handler.setStream(stream)
        for handler in stream_handlers():
            if id(handler.stream) in back:
                handler.setStream(back[id(handler.stream)])


def train_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """`sadm-train ARGS` in this process: `sadm_finetune.cli.main`, the function behind the console script and
    train_sadm.py, on one CPU process (what `accelerate launch --num_processes 1` gives), without the two
    interpreters (launcher and child) that import torch, diffusers and transformers again for every run.

    Returns what `accelerate_launch` returns: the exit status and the run's stdout and stderr (prints, progress
    bars, warnings and log records). An exception that escapes `main` (a crash, not a user error) propagates
    to the test. accelerate's singletons are reset before and after, so no state is carried from one run to
    the next."""
    from sadm_finetune.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    saved_env = os.environ.get("ACCELERATE_USE_CPU")
    os.environ["ACCELERATE_USE_CPU"] = "1"
    reset_accelerate_state()
    try:
        with _captured(stdout, stderr):
            code = main([str(a) for a in args])
    except BaseException:
        sys.stderr.write(stderr.getvalue()[-3000:])  # shown with the failing test
        raise
    finally:
        reset_accelerate_state()
        if saved_env is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = saved_env
    return subprocess.CompletedProcess(["sadm-train", *map(str, args)], code, stdout.getvalue(), stderr.getvalue())


def tiny_run_args(pretrained: Path, data: Path, out: Path, steps: int = 4) -> list[str]:
    return ["--pretrained", str(pretrained), "--train_data_dir", str(data), "--output_dir", str(out),
            "--max_train_steps", str(steps), "--train_batch_size", "4", "--learning_rate", "1e-3",
            "--structure_warmup_steps", "0", "--disc_width", "8", "--disc_depth", "2", "--disc_embed_dim", "16",
            "--num_validation_images", "1", "--validation_inference_steps", "2", "--report_to", "tensorboard"]


def weights_changed(out: Path, base: Path, name: str = "transformer/diffusion_pytorch_model.safetensors") -> float:
    """The largest change of any tensor of file `name` between an export and its base (same keys asserted)."""
    from safetensors.torch import load_file

    trained, original = load_file(str(out / name)), load_file(str(base / name))
    assert trained.keys() == original.keys()
    return max((trained[k] - original[k]).abs().max().item() for k in trained)


def launch_lora_and_full(tmp: Path, base: Path, lora_extra: list[str]) -> dict:
    """A text family's two launched end-to-end runs, side by side (their interpreters' imports overlap): a 2-step
    LoRA with SADM, cached text, buckets and `lora_extra`, and a 1-step full fine-tune with SADM off, both at 32 px
    on the captioned tiny folder: {"lora" / "full": (output folder, its CompletedProcess)}."""
    from tiny_sd import build_captioned_folder

    data = build_captioned_folder(tmp / "data")
    common = ["--resolution", "32", "--validation_prompts", "a red square", "--report_to", "none"]
    lora = tiny_run_args(base, data, tmp / "lora", steps=2) + common + [
        "--trainable", "lora", "--lora_rank", "4", "--learning_rate", "1e-2", "--cache_text_embeddings",
        "--text_cache_dir", str(tmp / "text"), "--aspect_ratio_buckets", *lora_extra]
    full = tiny_run_args(base, data, tmp / "full", steps=1) + common + ["--structure_weight", "0"]
    procs = accelerate_launch_together([(lora, offline_env(tmp / "lora-env")), (full, offline_env(tmp / "full-env"))])
    return {"lora": (tmp / "lora", procs[0]), "full": (tmp / "full", procs[1])}
