#!/usr/bin/env python
"""Where a toolkit step's time goes: inclusive timings of its parts, and torch.profiler's top ops.

The toolkit's step (one step of `loop.train_loop`, built as benchmarks/step_time.py builds it: `builders.build_run`
on a fixed cached-posterior batch) runs with its parts wrapped in timers from the outside (nothing in
sadm_finetune/ is edited; the wrappers go on instance attributes of the run's objects and on the module
attribute `sadm_finetune.train.loop.grad_norm`, after the warm-up steps): the denoiser forward (`adapter.predict`),
the VLB term (`run.vlb`), the two structure phases (the SADM term's `objective.generator_loss`,
`discriminator_loss`), each `accelerator.backward`, grad-norm clipping (`loop.grad_norm`), each optimizer
step. A step is the time between two of the loop's `on_update` callbacks; what is left of it is "rest"
(the fixed batch's fetch, the posterior draw, noise, timesteps, targets, the diffusion loss, logs, the
loop's bookkeeping). (The profiles in benchmarks/README.md were taken before the one-loop refactor, on
`StepRunner.micro_step`, whose "rest" had no loop bookkeeping.)
Wall time and process CPU time are both reported; on a machine shared with other jobs trust CPU time.

    python benchmarks/profile_step.py --model dit-s --mode sadm --steps 2
    python benchmarks/profile_step.py --model tiny --mode sadm --steps 30 --profiler
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_json  # noqa: E402
from step_time import _bare_stepper, _toolkit_run  # noqa: E402


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


class Instrumented:
    """The step's parts of a built run, wrapped in timers (instance attributes and `loop.grad_norm` only; the
    classes are untouched). `install()` after the warm-up; `new_step()` before each step (the next backward
    is the denoiser's); `remove()` puts `loop.grad_norm` back."""

    def __init__(self, run, timers: Timers) -> None:
        self.run, self.timers, self.phase = run, timers, "G"
        self.sadm = next((term for term in run.terms if term.name == "sadm"), None)

    def install(self) -> None:
        from sadm_finetune.train import loop

        run, timers = self.run, self.timers
        run.adapter.predict = timers.wrap("denoiser forward", run.adapter.predict)
        if run.vlb is not None:
            vlb = run.vlb
            run.vlb = timers.wrap("VLB term", lambda *a, **k: vlb(*a, **k))
        if self.sadm is not None:
            obj = self.sadm.objective
            obj.generator_loss = timers.wrap("G phase: D forward + L_S", obj.generator_loss)
            obj.discriminator_loss = timers.wrap("D phase: D forward + L_D", obj.discriminator_loss)
            self.sadm.optimizer.step = timers.wrap("D AdamW step", self.sadm.optimizer.step)
        backward = run.accelerator.backward

        def named_backward(loss, **kwargs):
            # The loop calls backward first for G (denoiser + D-in-G-phase), then once per D update.
            name = "G backward" if self.phase == "G" else "D backward"
            self.phase = "D"
            return timers.wrap(name, backward)(loss, **kwargs)

        run.accelerator.backward = named_backward
        self.grad_norm = grad_norm = loop.grad_norm
        g_params = run.trainable_parameters

        def named_grad_norm(accelerator, params, max_norm):
            name = "grad-norm clip (G)" if params is g_params else "grad-norm clip (D)"
            return timers.wrap(name, grad_norm)(accelerator, params, max_norm)

        loop.grad_norm = named_grad_norm  # apply_update looks it up in the module at each call
        run.optimizer.step = timers.wrap("G AdamW step", run.optimizer.step)

    def new_step(self) -> None:
        self.phase = "G"

    def remove(self) -> None:
        from sadm_finetune.train import loop

        loop.grad_norm = self.grad_norm


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
    timers = Timers()
    totals = {"wall": 0.0, "cpu": 0.0}
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False) \
        if args.profiler else None
    if args.mode == "bare":
        step, _, info = _bare_stepper(args.model, args.batch_size)
        for _ in range(args.warmup):
            step()
        if profiler is not None:
            profiler.__enter__()
        for _ in range(args.steps):
            w, c = time.perf_counter(), time.process_time()
            step()
            totals["wall"] += time.perf_counter() - w
            totals["cpu"] += time.process_time() - c
        if profiler is not None:
            profiler.__exit__(None, None, None)
    else:
        toolkit = _toolkit_run(args.model, args.batch_size, args.mode, Path(tmp.name),  # "plain" or "sadm"
                               args.warmup + args.steps)
        parts = Instrumented(toolkit.run, timers)
        mark = [0.0, 0.0]

        def on_update(state) -> None:  # after each update of train_loop: steps are the time between calls
            now, cpu_now = time.perf_counter(), time.process_time()
            if state.global_step > args.warmup:
                totals["wall"] += now - mark[0]
                totals["cpu"] += cpu_now - mark[1]
                if state.global_step == args.warmup + args.steps and profiler is not None:
                    profiler.__exit__(None, None, None)  # the timed steps only, not the loop's exit
            elif state.global_step == args.warmup:  # warm-up done: time the parts from the next step on
                parts.install()
                if profiler is not None:
                    profiler.__enter__()
            parts.new_step()
            mark[:] = time.perf_counter(), time.process_time()

        if args.warmup == 0:
            parts.install()
            if profiler is not None:
                profiler.__enter__()
        mark[:] = time.perf_counter(), time.process_time()
        try:
            toolkit.train(on_update)
        finally:
            parts.remove()
    total_wall, total_cpu = totals["wall"], totals["cpu"]

    n = args.steps
    rows = [(k, timers.wall[k] / n, timers.cpu[k] / n, timers.calls[k] / n) for k in timers.wall]
    # None of the timed parts nest (each is called by the loop or its update directly), so the rest is the
    # difference.
    rest_wall = total_wall / n - sum(r[1] for r in rows)
    rest_cpu = total_cpu / n - sum(r[2] for r in rows)
    rows.append(("rest (untimed parts of the step)", rest_wall, rest_cpu, 1))
    print(f"\n{args.model} / {args.mode}, batch {args.batch_size}, {torch.get_num_threads()} threads, {n} steps: "
          f"{total_wall / n:.4f} s wall, {total_cpu / n:.4f} s CPU per step")
    print(f"{'part':<38} {'wall s':>9} {'CPU s':>9} {'CPU %':>6} {'calls':>6}")
    for name, w, c, k in sorted(rows, key=lambda r: -r[2]):
        print(f"{name:<38} {w:>9.4f} {c:>9.4f} {100 * c / (total_cpu / n):>6.1f} {k:>6.1f}")
    if profiler is not None:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.json:
        write_json(args.json, {
            "model": args.model, "mode": args.mode, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "steps": n, "step_wall_s": total_wall / n, "step_cpu_s": total_cpu / n,
            "parts": {name: {"wall_s": w, "cpu_s": c, "calls_per_step": k} for name, w, c, k in rows},
        }, indent=1)


if __name__ == "__main__":
    main()
