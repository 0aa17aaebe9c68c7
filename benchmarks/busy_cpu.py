#!/usr/bin/env python
"""sadm-eval and a short sadm-train run, timed alone and beside a second CPU-heavy process, with OpenMP's
default (active) wait policy and with OMP_WAIT_POLICY=PASSIVE (what the CLI entry points set since
sadm_finetune/cpu_wait.py, unless the environment sets it).

The measured jobs, each a fresh process through its real entry point, torch at its default thread count (all
cores: OMP_NUM_THREADS is removed from their environment):

  eval   python -m sadm_finetune.evaluation.evaluate on the bundled demo DiT (sadm_finetune/assets/demo-dit-digits):
         10 classes x --samples_per_class (50: 500 samples), --num_inference_steps (50), FID/KID/precision/
         recall in the digits feature space and the structure probe (64 images), against builtin:digits.
  train  python train_sadm.py --config configs/demo.yaml for --train_steps (30) steps, SADM on, then the
         export and its final sample grid (1 image, 2 sampler steps), what a short run does.

The second process ("busy") is a toolkit training run: train_sadm.py on the demo recipe with an unreachable
step count, started first, its first step waited for, and killed after the measurement. It runs under the
same policy as the measured job, as both processes would by default (before the change: both active; after:
both passive). Its training speed during the measured window is reported too (steps/s, from its progress
bar), so a policy that sped one process up by slowing the other would show.

    python benchmarks/busy_cpu.py                  # ~45 min on a shared 2-core CPU (estimated; the busy active eval is half)
    python benchmarks/busy_cpu.py --samples_per_class 10 --num_inference_steps 25 --train_steps 10   # 9 min: README's
    python benchmarks/busy_cpu.py --quick          # 100 samples x 10 steps, 5 training steps: a smoke check

Prints a table and writes benchmarks/results/busy_cpu.json (with the load average seen before each job: the
machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported as benchmarks.busy_cpu
from harness import DEMO_BASE, DEMO_RECIPE, OFFLINE, RESULTS as RESULTS_DIR, ROOT, TRAIN_SCRIPT, write_json  # noqa: E402

RESULTS = RESULTS_DIR / "busy_cpu.json"
POLICIES = ("ACTIVE", "PASSIVE")


def job_env(policy: str, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update({"OMP_WAIT_POLICY": policy, **OFFLINE, "HF_HOME": str(tmp / "hf_home"), "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    return env


def train_cmd(out: Path, steps: int) -> list[str]:
    return [sys.executable, str(TRAIN_SCRIPT), "--config", str(DEMO_RECIPE),
            "--output_dir", str(out), "--max_train_steps", str(steps), "--report_to", "none",
            "--num_validation_images", "1", "--validation_inference_steps", "2"]


def eval_cmd(out: Path, samples_per_class: int, steps: int) -> list[str]:
    return [sys.executable, "-m", "sadm_finetune.evaluation.evaluate", "--pipeline", str(DEMO_BASE),
            "--reference_dataset", "builtin:digits", "--features", "digits", "--samples_per_class",
            str(samples_per_class), "--num_inference_steps", str(steps), "--output_json", str(out / "eval.json")]


class Background:
    """A long toolkit training run beside the measured job; its progress bar tells its steps done."""

    def __init__(self, policy: str, tmp: Path, name: str) -> None:
        self.log = tmp / f"{name}.log"
        self.handle = open(self.log, "w")
        self.proc = subprocess.Popen(train_cmd(tmp / name, 10**7), env=job_env(policy, tmp), cwd=ROOT,
                                     stdout=self.handle, stderr=subprocess.STDOUT)

    def steps(self) -> int:
        found = re.findall(r"steps:\s+\d+%\S*\s*\|[^|]*\|\s*(\d+)/", self.log.read_text(errors="replace"))
        return int(found[-1]) if found else 0

    def wait_until_training(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while self.steps() < 1:
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the background run never started training; see {self.log}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.handle.close()


def measure(name: str, cmd: list[str], policy: str, busy: bool, tmp: Path, timeout: float) -> dict:
    background = Background(policy, tmp, f"background-{name}-{policy}") if busy else None
    try:
        if background is not None:
            background.wait_until_training()
            steps_before = background.steps()
        load = os.getloadavg()[0]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=job_env(policy, tmp), cwd=ROOT, capture_output=True, text=True,
                                  timeout=timeout)
            seconds, status = time.perf_counter() - start, "ok" if proc.returncode == 0 else "failed"
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-3000:])
        except subprocess.TimeoutExpired:
            seconds, status = time.perf_counter() - start, f"timed out (> {timeout:.0f} s)"
        row = {"job": name, "load": "busy" if busy else "alone", "policy": policy, "seconds": round(seconds, 1),
               "status": status, "load_average_before": round(load, 2)}
        if background is not None:
            row["background_steps_per_s"] = round((background.steps() - steps_before) / seconds, 3)
        return row
    finally:
        if background is not None:
            background.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples_per_class", type=int, default=50)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--train_steps", type=int, default=30)
    parser.add_argument("--jobs", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    parser.add_argument("--timeout", type=float, default=1200, help="Seconds per measured job.")
    parser.add_argument("--quick", action="store_true", help="A smoke check: 100 samples x 10 steps, 5 train steps.")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.samples_per_class, args.num_inference_steps, args.train_steps = 10, 10, 5

    rows = []
    with tempfile.TemporaryDirectory(prefix="busy-cpu-") as tmp_name:
        tmp = Path(tmp_name)
        for name in args.jobs:
            for busy in (False, True):
                for policy in POLICIES:
                    out = tmp / f"{name}-{'busy' if busy else 'alone'}-{policy}"
                    out.mkdir()
                    cmd = (eval_cmd(out, args.samples_per_class, args.num_inference_steps) if name == "eval"
                           else train_cmd(out / "run", args.train_steps))
                    rows.append(measure(name, cmd, policy, busy, tmp, args.timeout))
                    print(json.dumps(rows[-1]), flush=True)

    header = f"{'job':6} {'beside':7} {'OMP_WAIT_POLICY':16} {'wall s':>8} {'background steps/s':>19}  status"
    lines = [header, "-" * len(header)]
    for r in rows:
        bg = f"{r['background_steps_per_s']:.2f}" if "background_steps_per_s" in r else "-"
        lines.append(f"{r['job']:6} {('a run' if r['load'] == 'busy' else 'nothing'):7} {r['policy']:16} "
                     f"{r['seconds']:8.1f} {bg:>19}  {r['status']}")
    print("\n".join(lines))
    result = {
        "what": "wall seconds of sadm-eval and a short sadm-train run, alone and beside a toolkit training run, "
                "OpenMP wait policy active (the old default) vs passive (the CLI's default now)",
        "cpu_count": os.cpu_count(), "torch_threads": "default (all cores)",
        "eval": {"pipeline": "sadm_finetune/assets/demo-dit-digits", "samples": 10 * args.samples_per_class,
                 "num_inference_steps": args.num_inference_steps, "features": "digits", "probe_images": 64},
        "train": {"config": "configs/demo.yaml", "steps": args.train_steps},
        "rows": rows, "table": lines,
    }
    write_json(args.output, result, indent=1, newline=True)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
