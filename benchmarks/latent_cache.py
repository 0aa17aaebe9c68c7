#!/usr/bin/env python
"""Epoch time with and without `--cache_latents`, with 0 and 2 data-loader workers.

The demo-sized pipeline (a 3-block AutoencoderKL 32x32x3 <-> 8x8x4, as scripts/make_demo_base.py builds it,
and the tiny demo DiT with learned sigma), random weights, saved to a temp folder and loaded through
`load_family` as a run loads it; the data are scikit-learn's digits (1,797 images, 32x32, `builtin:digits`),
centre-cropped, batch 32 (56 batches per epoch). Everything is built as `training.train` builds it
(`loader.build_train_dataloader`, then `builders.build_run` with its one `accelerator.prepare`), SADM off,
so that the numbers show the data path and the VAE, not the structure term.

For each configuration, in a fresh process:
  data epoch   iterate the prepared data loader once, no training step (decode + transform + collate, or
               reads of cached posteriors)
  train epoch  one epoch of the training loop (`loop.train_loop`, max_train_steps = the epoch's batches; from
               the loop's start to its last `on_update` callback), batches fetched from the prepared loader
               as in a run (with the cache: no VAE encoder, a posterior draw instead). (The numbers in
               benchmarks/README.md were taken before the one-loop refactor, with `StepRunner.micro_step`
               called over the prepared loader.)
The one-off cache build (encoding the 1,797 images) is timed in its own process first.

    python benchmarks/latent_cache.py            # ~1-2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported as benchmarks.latent_cache
from harness import answer, machine_meta, spawn_worker, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "latent_cache.json"


def build_pipeline(path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 64), layers_per_block=1,
                        latent_channels=4, norm_num_groups=32, sample_size=32)
    transformer = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8,
                                        num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False, prediction_type="epsilon")
    id2label = {i: str(i) for i in range(10)}
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    pipe.register_to_config(id2label=id2label)
    pipe.save_pretrained(path, safe_serialization=True)


def worker(pipeline: str, cache_dir: str, cache: bool, workers: int, batch_size: int, what: str, threads: int) -> dict:
    from sadm_finetune.train import builders
    from sadm_finetune.train.checkpointing import TrainState
    from sadm_finetune.config.run import build_config
    from sadm_finetune.data.datasets import open_train_data
    from sadm_finetune.data.loader import build_train_dataloader
    from sadm_finetune.train.loop import train_loop
    from sadm_finetune.families.loading import load_family
    from sadm_finetune.train.entry import place_frozen_modules
    import torch

    if threads:
        torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as out:
        config = build_config(dict(
            pretrained_model_name_or_path=pipeline, dataset_name="builtin:digits", resolution=32, center_crop=True,
            cache_latents=cache, latent_cache_dir=cache_dir, dataloader_num_workers=workers,
            train_batch_size=batch_size, structure_weight=0.0, report_to="none", output_dir=out))
        data = open_train_data(config.data)
        accelerator = builders.make_accelerator(config, Path(out))
        adapter = load_family(config.model)
        adapter.prepare_training()
        place_frozen_modules(adapter, accelerator.device, builders.weight_dtype_of(accelerator))  # as entry.train
        start = time.perf_counter()
        dataset, loader = build_train_dataloader(config, accelerator, adapter, data, 32)
        build_s = time.perf_counter() - start
        if what == "build":
            return {"cache_build_s": build_s, "num_samples": len(data)}
        config.training.max_train_steps = len(loader)  # one epoch (drop_last batches)
        run, loader, _ = builders.build_run(config, accelerator, adapter, loader)

        start = time.perf_counter()
        n = sum(1 for _ in loader)
        data_epoch_s = time.perf_counter() - start

        state = TrainState()
        state.epoch = 1  # the loop calls set_epoch(1) on the loader and the dataset
        end = {}

        def on_update(state) -> None:
            end["s"] = time.perf_counter()

        start = time.perf_counter()
        stopped = train_loop(run, loader, dataset, state, on_update)
        assert not stopped and state.global_step == n and state.epoch == 1, (state, n)
        train_epoch_s = end["s"] - start
    return {"cache": cache, "num_workers": workers, "batches": n, "dataset_build_s": build_s,
            "data_epoch_s": data_epoch_s, "train_epoch_s": train_epoch_s, "threads": torch.get_num_threads()}


def _spawn(*args) -> dict:
    return spawn_worker(__file__, "--_worker", list(args), f"worker {args[2:]}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", default="0,2", help="comma-separated dataloader_num_workers values")
    p.add_argument("--rounds", type=int, default=1, help="repetitions of every configuration (order rotated)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in the training process (0: torch's default); 1 by default, as in "
                        "step_time.py. Data-loader workers always use 1")
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        answer(worker, args._worker)
        return

    configs = [(cache, int(w)) for cache in (False, True) for w in args.workers.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        pipeline, cache_dir = Path(tmp) / "pipeline", Path(tmp) / "latents"
        build_pipeline(pipeline)
        build = _spawn(str(pipeline), str(cache_dir), True, 0, args.batch_size, "build", args.threads)
        print(f"cache build: {build['cache_build_s']:.1f} s for {build['num_samples']} images", flush=True)
        for r in range(args.rounds):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for cache, workers in order:
                run = _spawn(str(pipeline), str(cache_dir), cache, workers, args.batch_size, "epoch", args.threads)
                run["round"] = r
                runs.append(run)
                print(f"[cache {'on ' if cache else 'off'} workers {workers}] data epoch {run['data_epoch_s']:.2f} s, "
                      f"train epoch {run['train_epoch_s']:.2f} s", flush=True)

    print(f"\n{'cache':<6} {'workers':>7} {'data epoch s':>13} {'train epoch s':>14} {'s/step':>8}")
    summary = []
    for cache, workers in configs:
        rs = [r for r in runs if r["cache"] == cache and r["num_workers"] == workers]
        data_s = statistics.median(r["data_epoch_s"] for r in rs)
        train_s = statistics.median(r["train_epoch_s"] for r in rs)
        summary.append({"cache": cache, "num_workers": workers, "data_epoch_s": data_s, "train_epoch_s": train_s,
                        "s_per_step": train_s / rs[0]["batches"], "batches": rs[0]["batches"]})
        print(f"{'on' if cache else 'off':<6} {workers:>7} {data_s:>13.2f} {train_s:>14.2f} "
              f"{train_s / rs[0]['batches']:>8.4f}")
    meta = {**machine_meta(), "batch_size": args.batch_size, "threads": args.threads}
    write_json(args.output, {"meta": meta, "cache_build": build, "summary": summary, "runs": runs}, indent=1)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
