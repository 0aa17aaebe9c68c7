#!/usr/bin/env python
"""Per-step wall time and peak memory: a bare PyTorch loop vs the toolkit's step, SADM off and on.

Three columns, for each model, on the same model, batch and optimizer (AdamW, the toolkit's defaults):

  bare   A plain PyTorch loop, no toolkit: precomputed latents (B, 4, h, w) held in memory; per step
         noise + timesteps, `add_noise` by hand, transformer forward, MSE of the epsilon channels to the
         noise, backward, AdamW step, zero_grad. No VLB, no grad clipping, no logging.
  plain  The toolkit's training loop (`loop.train_loop`) with structure_weight=0, its objects built by
         `builders.build_run` as `training.train` builds them (Accelerator, DiTAdapter, AdamW, constant
         scheduler, accelerator.prepare). Fed one fixed batch of cached VAE posteriors ({"latent_mean",
         "latent_std", "class_labels"}, the `--cache_latents` batch) through a pass-through iterable, so it
         draws `mean + std * noise` and never runs the VAE encoder. A step is the time between two of the
         loop's `on_update` callbacks. It does what a run does by default: class dropout, DiT's learned-sigma
         VLB term, grad-norm clipping (max_grad_norm=1), a finiteness check, the step's logs as floats, the
         loop's bookkeeping (progress bar, `accelerator.log` with no tracker, the collective stop check).
         (Numbers taken before the one-loop refactor timed `StepRunner.micro_step` instead: the same step
         without the loop's bookkeeping.)
  sadm   The same with SADM on: SADMConfig defaults plus the demo recipe's `sadm:` section for the tiny
         model (configs/demo.yaml: disc width 16, depth 2, embed 64), plain SADMConfig defaults for DiT-S.
         One D update per step (disc_every=1); lambda > 0 from step 0 (linear ramp).

Each (model, column) runs in a fresh subprocess, so peaks do not mix; the columns run in rounds with a
rotated order, so load from other processes on the machine hits them alike. Warm-up steps are timed but
excluded. Memory (CPU): resident set size from /proc/self/status. After the model, optimizer and toolkit
objects are built, the process's high-water mark is reset (`/proc/self/clear_refs` = 5) and `VmRSS` read
as the base; after the steps `VmHWM` is the peak. `step memory` = peak - base: the optimizer state (made
on the first step), gradients, activations and the step's temporaries. (tracemalloc does not see torch's
allocations.) On CUDA the same fields come from torch.cuda.max_memory_allocated instead (untested here).

Each worker runs torch with one intra-op thread unless `--threads` says otherwise (the numbers in
benchmarks/README.md were taken that way on a 2-core machine shared with other jobs); process CPU time per
step is reported next to wall time because it is much less sensitive to other load.

    python benchmarks/step_time.py            # ~6 minutes on 2 cores (DiT-S: ~10 s a step on one thread)
    python benchmarks/step_time.py --quick    # smoke check of the harness, < 1 minute; not for numbers
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported as benchmarks.step_time
from harness import (answer, offline_env, proc_status_kb, quantiles as _quantiles, reset_peak_rss,  # noqa: E402
                     spawn_worker, write_json)

RESULTS = Path(__file__).resolve().parent / "results" / "step_time.json"
MODES = ("bare", "plain", "sadm")
# --terms: the related papers' terms on the tiny models, each as one more column (settings of the terms study,
# benchmarks/sadm_study.py --terms). REPA reads cached encoder features (the --cache_latents batch), so the
# column times the projector and its loss, not the frozen encoder.
TERM_MODES = ("repa", "sddit", "sadm+repa", "sadm+sddit", "sadm+sddit-every4")
REPA_ENCODER = Path(__file__).resolve().parents[1] / "runs" / "digits-encoder"
TERM_OVERRIDES = {
    "repa": dict(repa_weight=0.5, repa_encoder=str(REPA_ENCODER), repa_depth=2, repa_projector_dim=256,
                 repa_encoder_resolution=32, cache_latents=True, center_crop=True),
    "sddit": dict(sddit_weight=0.5, sddit_encoder_depth=2, sddit_head_dim=256, sddit_head_hidden_dim=256),
}
# the lazy SD-DiT (--sddit_every 4): the term on one update in four, so its steps alternate between two costs and
# the column's amortised cost is its mean step time ("time_mean" ratios), not its median (the cheap steps')
TERM_OVERRIDES["sddit-every4"] = {**TERM_OVERRIDES["sddit"], "sddit_every": 4}


def mode_overrides(model: str, mode: str) -> dict:
    """A column's config on top of the run's: SADM on (the demo's settings on the tiny models) or off, and each
    term the column names ("sadm+sddit-every4": SADM and the lazy SD-DiT)."""
    overrides: dict = {}
    if "sadm" in mode.split("+"):
        if model.startswith("tiny"):
            overrides.update(DEMO_SADM)
    else:
        overrides["structure_weight"] = 0.0
    for term in mode.split("+"):
        overrides.update(TERM_OVERRIDES.get(term, {}))
    return overrides

# DiTTransformer2DModel kwargs. tiny: the demo DiT (learned sigma, as scripts/make_demo_base.py builds it);
# dit-s: DiT-S/2 (hidden 384 = 6 heads x 64, depth 12, patch 2) on 4x32x32 latents (256 px), learned sigma.
MODELS = {
    "tiny": dict(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=4,
                 sample_size=8, patch_size=2, num_embeds_ada_norm=1000),
    # the scale study's larger demo DiTs (make_demo_base.py --dit_heads 8 / 16): same depth, 2x / 4x the width
    "tiny-6m": dict(num_attention_heads=8, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=4,
                    sample_size=8, patch_size=2, num_embeds_ada_norm=1000),
    "tiny-24m": dict(num_attention_heads=16, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=4,
                     sample_size=8, patch_size=2, num_embeds_ada_norm=1000),
    "dit-s": dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
                  sample_size=32, patch_size=2, num_embeds_ada_norm=1000),
}
# The `sadm:` section of configs/demo.yaml (applied to the tiny models only).
DEMO_SADM = dict(structure_weight=0.01, structure_warmup_steps=100, disc_learning_rate=1e-4, disc_width=16,
                 disc_depth=2, disc_embed_dim=64)


# ---------------------------------------------------------------------------------------------
# Worker: one (model, mode) in this process.


class _Memory:
    """Peak memory above a base, for the process (CPU RSS) or the CUDA caching allocator."""

    def __init__(self, device) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch
        self.method = "cuda max_memory_allocated" if self.cuda else "VmHWM - VmRSS (clear_refs reset)"

    def reset(self) -> float:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            return self.torch.cuda.memory_allocated() / 2**20
        if not reset_peak_rss():  # the resident-set high-water mark, reset to the current RSS
            self.method = "ru_maxrss - VmRSS (no clear_refs: peak may include construction)"
        return proc_status_kb("VmRSS") / 1024

    def peak(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**20
        return proc_status_kb("VmHWM") / 1024


def _build_transformer(model: str, seed: int = 0):
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(**MODELS[model])


def _batch(model: str, batch_size: int, device, seed: int = 1):
    """Fixed cached-posterior batch (unscaled mean, std) and labels; the same every step."""
    import torch

    cfg = MODELS[model]
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    mean = torch.randn(shape, generator=g)
    std = 0.05 + 0.05 * torch.rand(shape, generator=g)
    labels = torch.randint(0, 10, (batch_size,), generator=g)
    return mean.to(device), std.to(device), labels.to(device)


def _bare_stepper(model: str, batch_size: int):
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transformer = _build_transformer(model).to(device).train()
    # Toolkit defaults (TrainingConfig): lr 1e-4, betas (0.9, 0.999), weight decay 0, eps 1e-8.
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    alphas_cumprod = DDPMScheduler(beta_schedule="linear").alphas_cumprod.to(device)
    mean, _, class_labels = _batch(model, batch_size, device)
    latents = mean  # precomputed latents
    channels = latents.shape[1]
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        noise = torch.randn(latents.shape, generator=gen, device=device)
        timesteps = torch.randint(0, 1000, (batch_size,), generator=gen, device=device)
        ab = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy_latents = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        model_pred = transformer(noisy_latents, timestep=timesteps, class_labels=class_labels).sample
        loss = F.mse_loss(model_pred[:, :channels], noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, device, {"denoiser_params": sum(p.numel() for p in transformer.parameters())}


class FixedBatches:
    """The toolkit loop's data here: the same batch forever, with the `set_epoch` the loop calls.

    `accelerator.prepare` passes an object it does not know through unchanged, so the batch (already on the
    device) is neither collated nor copied per step: like the old benchmark, which fed `StepRunner.micro_step`
    one fixed batch. The loop's own epoch never ends; it stops at `max_train_steps`."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        while True:
            yield self.batch


class ToolkitRun:
    """A run built as `training.train` builds it (`builders.build_run`), minus the data pipeline, the
    trackers and the checkpoint/validation callback; `train(on_update)` runs `loop.train_loop` for
    `max_train_steps` steps, calling `on_update(state)` after each update (so the time between two calls is
    one whole step of the loop, the fixed batch's fetch included)."""

    def __init__(self, run, dataloader, dataset, state, info: dict) -> None:
        self.run, self.dataloader, self.dataset, self.state, self.info = run, dataloader, dataset, state, info

    def train(self, on_update) -> None:
        from sadm_finetune.train.loop import train_loop

        accelerator = self.run.accelerator
        log = accelerator.log

        def keep_logs(values, step=None, **kwargs):  # the loop's logs of the last step, for the JSON record
            self.info["logs"] = dict(values)
            return log(values, step=step, **kwargs)

        accelerator.log = keep_logs  # this instance only; no tracker is configured (report_to none)
        stopped = train_loop(self.run, self.dataloader, self.dataset, self.state, on_update)
        assert not stopped and self.state.global_step == self.run.config.training.max_train_steps


def _toolkit_run(model: str, batch_size: int, mode: str, workdir: Path, steps: int) -> ToolkitRun:
    """`builders.build_run` on a DiT pipeline of `model`, fed a fixed cached-posterior batch, for `steps` steps."""
    import torch
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    from sadm_finetune.train import builders
    from sadm_finetune.train.checkpointing import TrainState
    from sadm_finetune.config.run import build_config
    from sadm_finetune.families.dit import DiTAdapter
    from sadm_finetune.train.entry import place_frozen_modules

    overrides = dict(pretrained_model_name_or_path=str(workdir / "unused"), dataset_name="builtin:digits",
                     train_batch_size=batch_size, report_to="none", output_dir=str(workdir / "out"),
                     max_train_steps=steps, **mode_overrides(model, mode))
    config = build_config(overrides)
    t, s = config.training, config.sadm
    accelerator = builders.make_accelerator(config, workdir / "out")
    set_seed(t.seed)

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)  # never run: batches are cached
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False, prediction_type="epsilon")
    pipeline = DiTPipeline(transformer=_build_transformer(model), vae=vae, scheduler=scheduler,
                           id2label={i: str(i) for i in range(10)})
    adapter = DiTAdapter(pipeline, config.model)
    adapter.prepare_training()
    place_frozen_modules(adapter, accelerator.device, builders.weight_dtype_of(accelerator))  # as entry.train does
    mean, std, class_labels = _batch(model, batch_size, accelerator.device)
    batch = {"latent_mean": mean, "latent_std": std, "class_labels": class_labels}
    if config.repa.enabled:  # cached encoder features, (B, E, 8, 8): what the latent cache's REPA shards give
        from sadm_finetune.terms.repa.term import FEATURES_KEY, load_encoder_config

        width = load_encoder_config(config.repa.repa_encoder).hidden_size
        batch[FEATURES_KEY] = torch.randn(batch_size, width, 8, 8, generator=torch.Generator().manual_seed(2)).to(
            accelerator.device)
    data = FixedBatches(batch)
    run, dataloader, _ = builders.build_run(config, accelerator, adapter, data)
    info = {"denoiser_params": sum(p.numel() for p in run.unwrapped_denoiser.parameters()), "logs": {}}
    sadm_term = next((term for term in run.terms if term.name == "sadm"), None)
    if sadm_term is not None:
        info["disc_params"] = sum(p.numel() for p in sadm_term.unwrapped_disc.parameters())
        info["sadm"] = {k: getattr(s, k) for k in ("structure_weight", "structure_warmup_steps", "disc_width",
                                                   "disc_depth", "disc_embed_dim", "disc_spectral_norm",
                                                   "disc_every", "disc_steps")}
    return ToolkitRun(run, dataloader, data, TrainState(), info)


def worker(model: str, mode: str, batch_size: int, warmup: int, steps: int, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as tmp:
        if mode == "bare":
            step, device, info = _bare_stepper(model, batch_size)
        else:
            toolkit = _toolkit_run(model, batch_size, mode, Path(tmp), warmup + steps)
            device, info = toolkit.run.accelerator.device, toolkit.info
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        memory = _Memory(device)
        base_mb = memory.reset()
        times, cpu_times = [], []
        mark = [time.perf_counter(), time.process_time()]

        def tick(*_) -> None:  # one step done: its wall and CPU time since the previous tick
            sync()
            now, cpu_now = time.perf_counter(), time.process_time()
            times.append(now - mark[0])
            cpu_times.append(cpu_now - mark[1])
            mark[:] = now, cpu_now

        sync()
        mark[:] = time.perf_counter(), time.process_time()
        if mode == "bare":
            for _ in range(warmup + steps):
                step()
                tick()
        else:
            toolkit.train(tick)  # train_loop, warmup + steps updates; tick after each
        peak_mb = memory.peak()
    return {"model": model, "mode": mode, "batch_size": batch_size, "device": str(device),
            "threads": torch.get_num_threads(), "warmup_times_s": times[:warmup], "step_times_s": times[warmup:],
            "step_cpu_times_s": cpu_times[warmup:],
            "base_mb": base_mb, "peak_mb": peak_mb, "step_mem_mb": peak_mb - base_mb, "memory_method": memory.method,
            **info}


# ---------------------------------------------------------------------------------------------
# Driver: rounds of fresh subprocesses, then a table.


def _spawn(model: str, mode: str, batch_size: int, warmup: int, steps: int, threads: int) -> dict:
    return spawn_worker(__file__, "--_worker", [model, mode, batch_size, warmup, steps, threads],
                        f"worker {model}/{mode}", offline_env(TOKENIZERS_PARALLELISM="false"))


def summarise(runs: list[dict]) -> dict:
    summary: dict = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        per_mode = {}
        for mode in MODES + TERM_MODES:
            rs = [r for r in runs if r["model"] == model and r["mode"] == mode]
            if not rs:
                continue
            per_mode[mode] = {
                "time_s": _quantiles([t for r in rs for t in r["step_times_s"]]),
                # Median of the per-process round medians: robust to one round hit by outside load.
                "time_s_round_medians": [statistics.median(r["step_times_s"]) for r in rs],
                # the amortised cost, for a column whose steps differ by design (a lazy term)
                "time_s_mean": statistics.fmean(t for r in rs for t in r["step_times_s"]),
                # Process CPU time (all threads): far less sensitive than wall time to other load on the machine.
                "cpu_s": _quantiles([t for r in rs for t in r["step_cpu_times_s"]]),
                "step_mem_mb": statistics.median(r["step_mem_mb"] for r in rs),
                "peak_mb": statistics.median(r["peak_mb"] for r in rs),
                "base_mb": statistics.median(r["base_mb"] for r in rs),
            }
        ratios = {}
        for num, den in (("plain", "bare"), ("sadm", "plain"), ("sadm", "bare"),
                         *((term, "plain") for term in TERM_MODES)):
            if num in per_mode and den in per_mode:
                a, b = per_mode[num], per_mode[den]
                ratios[f"{num}/{den}"] = {
                    "time": a["time_s"]["median"] / b["time_s"]["median"],
                    "time_mean": a["time_s_mean"] / b["time_s_mean"],
                    "cpu_time": a["cpu_s"]["median"] / b["cpu_s"]["median"],
                    "step_mem": a["step_mem_mb"] / b["step_mem_mb"],
                    "peak_mem": a["peak_mb"] / b["peak_mb"],
                }
        summary[model] = {"modes": per_mode, "ratios": ratios}
    return summary


def print_table(summary: dict, batch_size: int) -> None:
    head = (f"{'model':<7} {'column':<9} {'median s/step':>13} {'IQR':>17} {'min..max':>17} {'n':>3} "
            f"{'CPU s/step':>10} {'base MB':>8} {'peak MB':>8} {'step MB':>8}")
    print(f"\nbatch {batch_size}, fp32\n" + head + "\n" + "-" * len(head))
    for model, s in summary.items():
        for mode, m in s["modes"].items():
            t = m["time_s"]
            print(f"{model:<7} {mode:<9} {t['median']:>13.4f} {t['q1']:>8.4f}-{t['q3']:<8.4f} "
                  f"{t['min']:>8.4f}-{t['max']:<8.4f} {t['n']:>3} {m['cpu_s']['median']:>10.4f} {m['base_mb']:>8.0f} "
                  f"{m['peak_mb']:>8.0f} {m['step_mem_mb']:>8.0f}")
    print("\nratios (median time; step memory = peak - base; peak = absolute peak RSS)")
    for model, s in summary.items():
        for name, r in s["ratios"].items():
            print(f"{model:<7} {name:<15} time {r['time']:.3f}  mean time {r['time_mean']:.3f}  CPU time {r['cpu_time']:.3f}  "
                  f"step memory {r['step_mem']:.3f}  peak {r['peak_mem']:.3f}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,dit-s", help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per (model, column), order rotated")
    p.add_argument("--tiny_steps", type=int, default=30, help="timed steps per tiny process")
    p.add_argument("--tiny_warmup", type=int, default=5, help="untimed warm-up steps per tiny process")
    p.add_argument("--dits_steps", type=int, default=3, help="timed steps per DiT-S process")
    p.add_argument("--dits_warmup", type=int, default=1, help="untimed warm-up steps per DiT-S process")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per worker (0: torch's default, one per core). 1 by default: the "
                        "ratios are the point, and with several threads OpenMP spin-waits blow up under other load")
    p.add_argument("--output", type=Path, default=None,
                   help=f"JSON results file (default {RESULTS.relative_to(RESULTS.parents[2])}; --quick: *_quick.json)")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: tiny model only, 1 round, 2 warm-up + 5 timed steps")
    p.add_argument("--terms", action="store_true",
                   help=f"also time the loss terms' columns ({', '.join(TERM_MODES)}) on the tiny models; REPA needs "
                        "scripts/make_digits_encoder.py --output_dir runs/digits-encoder first")
    p.add_argument("--modes", default=None,
                   help="comma-separated columns to time (default: all; e.g. plain,sadm,sadm+sddit,sadm+sddit-every4)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _loadavg() -> list[float]:
    return list(os.getloadavg())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._worker:
        answer(worker, args._worker)
        return
    models = args.models.split(",")
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: unknown model {m!r}; use {', '.join(MODELS)}")
    for mode in args.modes.split(",") if args.modes else ():
        if mode not in MODES + TERM_MODES or (mode in TERM_MODES and not args.terms):
            raise SystemExit(f"--modes: {mode!r} is not a column of this run; use "
                             f"{', '.join(MODES)}, or with --terms also {', '.join(TERM_MODES)}")
    if args.quick:
        models, args.rounds, args.tiny_steps, args.tiny_warmup = ["tiny"], 1, 5, 2
    if args.output is None:
        args.output = RESULTS.with_name("step_time_quick.json") if args.quick else RESULTS
    plan = {m: (args.tiny_warmup, args.tiny_steps) for m in MODELS if m.startswith("tiny")}
    plan["dit-s"] = (args.dits_warmup, args.dits_steps)
    load_before, started = _loadavg(), time.time()
    runs = []
    for model in models:
        warmup, steps = plan[model]
        for r in range(args.rounds):
            modes = MODES + (TERM_MODES if args.terms and model.startswith("tiny") else ())
            modes = tuple(m for m in modes if not args.modes or m in args.modes.split(","))
            order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate which column goes first
            for mode in order:
                t0 = time.time()
                run = _spawn(model, mode, args.batch_size, warmup, steps, args.threads)
                run["round"] = r
                runs.append(run)
                print(f"[{model} {mode} round {r}] median {statistics.median(run['step_times_s']):.4f} s/step, "
                      f"step memory {run['step_mem_mb']:.0f} MB ({time.time() - t0:.0f} s)", flush=True)
    summary = summarise(runs)
    print_table(summary, args.batch_size)
    import torch

    meta = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "_worker"},
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": _loadavg(),
            "wall_s": time.time() - started, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "columns": {"bare": "plain PyTorch loop on precomputed latents: forward, MSE(eps), backward, AdamW",
                        "plain": "loop.train_loop step (between on_update calls), structure_weight=0, "
                                 "cached-posterior batch (no VAE)",
                        "sadm": "loop.train_loop step (between on_update calls), SADM on (1 D update per step), "
                                "cached-posterior batch",
                        **{term: f"as plain, with {term} on ({TERM_OVERRIDES.get(term, 'SADM and the term as in their columns')}); "
                                 "REPA from cached features" for term in TERM_MODES}}}
    write_json(args.output, {"meta": meta, "summary": summary, "runs": runs}, indent=1)
    print(f"\nwrote {args.output} ({meta['wall_s']:.0f} s; load average before {load_before[0]:.2f}, "
          f"after {meta['loadavg_after'][0]:.2f})")


if __name__ == "__main__":
    main()
