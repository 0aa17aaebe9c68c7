"""What every benchmark script shares: paths, the offline environment of the processes it starts, running the
trainer and sadm-eval as users do (skipping runs already done), worker processes that answer with one JSON line,
peak-memory readings, atomic result files, and the summaries (mean and spread, quartiles, paired t intervals).

A script keeps what it measures (its arms, flags, timing and output format); it takes the mechanics from here, so
that a fix to, say, the environment of a launched run or the write of a result file is made once."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRAIN_SCRIPT = ROOT / "train_sadm.py"
DEMO_BASE = ROOT / "sadm_finetune" / "assets" / "demo-dit-digits"
DEMO_RECIPE = ROOT / "configs" / "demo.yaml"
# A trained output folder: both files are written at the end of a run (the export last), so their presence means
# the run finished.
FINISHED_RUN = ("model_index.json", "training_config.yaml")

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------------------------
# Processes
def offline_env(threads: int | None = None, **extra: str) -> dict[str, str]:
    """This process's environment, offline (nothing a benchmark uses comes from the network), with torch's
    OpenMP and MKL threads capped at `threads` if given, and `extra` variables."""
    env = {**os.environ, **OFFLINE}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra)
    return env


def run_checked(cmd: Sequence[str], what: str, env: dict[str, str] | None = None, error: type[Exception] = RuntimeError,
                tail: int = 3000) -> subprocess.CompletedProcess:
    """Run `cmd` from the repository root with its output captured; on a non-zero exit raise `error` naming
    `what`, with the end of its stderr."""
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env if env is not None else offline_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise error(f"{what} failed:\n{proc.stderr[-tail:]}")
    return proc


def is_done(folder: Path, markers: Sequence[str] = FINISHED_RUN) -> bool:
    return all((folder / m).is_file() for m in markers)


def train_once(args: Sequence[str], out: Path, what: str, env: dict[str, str] | None = None,
               done: Sequence[str] = FINISHED_RUN, error: type[Exception] = RuntimeError) -> float | None:
    """`python train_sadm.py ARGS` unless `out` already holds a finished run (`done`; delete the folder to retrain).
    Returns the training's wall time in seconds, or None when the run was already done."""
    if is_done(out, done):
        return None
    start = time.time()
    run_checked([sys.executable, TRAIN_SCRIPT, *args], what, env, error)
    return time.time() - start


def sadm_eval_once(args: Sequence[str], out_json: Path, what: str, env: dict[str, str] | None = None) -> dict:
    """`python -m sadm_finetune.evaluation.evaluate ARGS --output_json OUT_JSON` unless OUT_JSON exists (written
    through a temporary name, so a killed evaluation leaves nothing); returns its metrics."""
    if not out_json.is_file():
        tmp = str(out_json) + ".tmp"
        run_checked([sys.executable, "-m", "sadm_finetune.evaluation.evaluate", *args, "--output_json", tmp], what,
                    env)
        os.replace(tmp, out_json)
    return json.loads(out_json.read_text())["metrics"]


def spawn_worker(script: str | Path, flag: str, payload: Any, what: str, env: dict[str, str] | None = None,
                 tail: int = 4000) -> Any:
    """`python SCRIPT FLAG JSON(payload)` in a fresh process (so peaks and caches do not mix between
    measurements); its last stdout line is its answer, as JSON (see `answer`)."""
    cmd = [sys.executable, str(script), flag, json.dumps(payload)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env if env is not None else offline_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-tail:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def answer(fn: Callable[..., Any], payload: str) -> None:
    """The worker's side of `spawn_worker`: `fn(*json.loads(payload))`, printed as one JSON line."""
    print(json.dumps(fn(*json.loads(payload))))


# ---------------------------------------------------------------------------------------------------------------
# Memory (Linux)
def proc_status_kb(field: str) -> int:
    """A `/proc/self/status` field in kB (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (VmHWM) to its current RSS (Linux >= 4.0); False if the
    kernel refuses (then VmHWM still holds the peak since the process started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Results
def write_json(path: str | Path, data: Any, indent: int | None = 1, newline: bool = False) -> Path:
    """`json.dumps(data, indent=indent)` (plus a final newline if asked) to `path`, atomically: a reader (or a
    `--report_only` run beside a study) never sees a half-written file. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=indent) + ("\n" if newline else ""))
    os.replace(tmp, path)
    return path


def machine_meta() -> dict[str, Any]:
    """Where and when: load average, CPU count, date (the conditions the numbers were measured under)."""
    return {"loadavg": list(os.getloadavg()), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# ---------------------------------------------------------------------------------------------------------------
# Summaries
def summarize(values: Sequence[float], range_: bool = False) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value), with min and max if `range_`, and n."""
    out = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    if range_:
        out.update(min=min(values), max=max(values))
    out["n"] = len(values)
    return out


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method), min, max and n."""
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "q1": q[0], "q3": q[2], "min": v[0], "max": v[-1], "n": len(v)}


def t_interval(diffs: Sequence[float]) -> dict:
    """Mean paired difference with its 95% Student-t interval (NaN bounds below 2 pairs)."""
    from scipy import stats

    diffs = list(diffs)
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": n, "diffs": diffs}
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "diffs": diffs}
