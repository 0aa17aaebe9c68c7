#!/usr/bin/env python
"""Where a toolkit step's time goes: inclusive timings of its parts, and torch.profiler's top ops.

The toolkit's step (`StepRunner.micro_step`, built as benchmarks/step_time.py builds it) runs with its
parts wrapped in timers from the outside (nothing in sadm_finetune/ is edited): the denoiser forward
(`adapter.predict`), the VLB term, the two structure phases (`SADMObjective.generator_loss`,
`discriminator_loss`), each `accelerator.backward`, grad-norm clipping, each optimizer step. What is
left of the step's time is "rest" (noise, timesteps, targets, the diffusion loss, logs, bookkeeping).
Wall time and process CPU time are both reported; on a machine shared with other jobs trust CPU time.

    python benchmarks/profile_step.py --model dit-s --mode sadm --steps 2
    python benchmarks/profile_step.py --model tiny --mode sadm --steps 30 --profiler
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import _bare_stepper, _toolkit_stepper  # noqa: E402


class Timers:
    def __init__(self) -> None:
        self.wall = collections.defaultdict(float)
        self.cpu = collections.defaultdict(float)
        self.calls = collections.Counter()
        self.stack: list[str] = []

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[name] += time.perf_counter() - w
                self.cpu[name] += time.process_time() - c
                self.calls[name] += 1
        return timed


def instrument(runner, timers: Timers) -> None:
    """Wrap the step's parts (instance attributes only; the classes are untouched)."""
    runner.adapter.predict = timers.wrap("denoiser forward", runner.adapter.predict)
    if runner.vlb is not None:
        vlb = runner.vlb
        runner.vlb = timers.wrap("VLB term", lambda *a, **k: vlb(*a, **k))
    if runner.objective is not None:
        obj = runner.objective
        obj.generator_loss = timers.wrap("G phase: D forward + L_S", obj.generator_loss)
        obj.discriminator_loss = timers.wrap("D phase: D forward + L_D", obj.discriminator_loss)
        runner.optimizer_d.step = timers.wrap("D AdamW step", runner.optimizer_d.step)
    backward = runner.accelerator.backward

    def named_backward(loss, **kwargs):
        # micro_step calls backward first for G (denoiser + D-in-G-phase), then once per D update.
        name = "G backward" if runner._phase == "G" else "D backward"
        runner._phase = "D"
        return timers.wrap(name, backward)(loss, **kwargs)

    runner.accelerator.backward = named_backward
    grad_norm = runner._grad_norm
    runner._grad_norm = lambda params: timers.wrap(
        "grad-norm clip (G)" if len(params) == len(runner.params_g) else "grad-norm clip (D)", grad_norm)(params)
    runner.optimizer_g.step = timers.wrap("G AdamW step", runner.optimizer_g.step)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dit-s", choices=["tiny", "dit-s"])
    p.add_argument("--mode", default="sadm", choices=["bare", "plain", "sadm"])
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default; 1 as step_time.py)")
    p.add_argument("--profiler", action="store_true", help="also print torch.profiler's top ops (self CPU time)")
    p.add_argument("--json", type=Path, help="write the breakdown here")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    if args.mode == "bare":
        step, _, info = _bare_stepper(args.model, args.batch_size)
        runner = None
    else:
        step, _, info = _toolkit_stepper(args.model, args.batch_size, args.mode == "sadm", Path(tmp.name))
        runner = step.runner
    for _ in range(args.warmup):
        step()
    timers = Timers()
    if runner is not None:
        instrument(runner, timers)

    total_wall = total_cpu = 0.0
    prof_ctx = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False) \
        if args.profiler else None
    if prof_ctx is not None:
        prof_ctx.__enter__()
    for _ in range(args.steps):
        if runner is not None:
            runner._phase = "G"
        w, c = time.perf_counter(), time.process_time()
        step()
        total_wall += time.perf_counter() - w
        total_cpu += time.process_time() - c
    if prof_ctx is not None:
        prof_ctx.__exit__(None, None, None)

    n = args.steps
    rows = [(k, timers.wall[k] / n, timers.cpu[k] / n, timers.calls[k] / n) for k in timers.wall]
    # None of the timed parts nest (each is called by micro_step directly), so the rest is the difference.
    rest_wall = total_wall / n - sum(r[1] for r in rows)
    rest_cpu = total_cpu / n - sum(r[2] for r in rows)
    rows.append(("rest (untimed parts of micro_step)", rest_wall, rest_cpu, 1))
    print(f"\n{args.model} / {args.mode}, batch {args.batch_size}, {torch.get_num_threads()} threads, {n} steps: "
          f"{total_wall / n:.4f} s wall, {total_cpu / n:.4f} s CPU per step")
    print(f"{'part':<38} {'wall s':>9} {'CPU s':>9} {'CPU %':>6} {'calls':>6}")
    for name, w, c, k in sorted(rows, key=lambda r: -r[2]):
        print(f"{name:<38} {w:>9.4f} {c:>9.4f} {100 * c / (total_cpu / n):>6.1f} {k:>6.1f}")
    if prof_ctx is not None:
        print(prof_ctx.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": args.model, "mode": args.mode, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "steps": n, "step_wall_s": total_wall / n, "step_cpu_s": total_cpu / n,
            "parts": {name: {"wall_s": w, "cpu_s": c, "calls_per_step": k} for name, w, c, k in rows},
        }, indent=1))


if __name__ == "__main__":
    main()
