"""The paper's evaluation protocol on a GPU, in one command: FID-50K with Inception-v3 (the TF-FID graph), class-
conditional DiT at 256 px, 250 sampler steps, guidance 1.5, the base and the fine-tune sampled alike.

    # the recipe's output against the base it was fine-tuned from (ImageNet reference statistics cached once)
    python benchmarks/paper_eval.py --pipeline runs/dit-xl --compare_with facebook/DiT-XL-2-256 \\
        --reference_dir /data/imagenet/train --reference_stats_cache ~/.cache/sadm-finetune/imagenet-train.npz
    # the expected cost first: times one batch on this GPU and extrapolates (no reference needed)
    python benchmarks/paper_eval.py --pipeline facebook/DiT-XL-2-256 --estimate_only

Expected cost on one H200 (bf16, estimated from DiT-XL/2's 119 GFLOPs per forward at 256 px, two forwards per step
with guidance, at 40% of the GPU's ~990 dense bf16 TFLOP/s): 250 steps x 50,000 images is about 3.0e18 FLOPs,
about 2 h per pipeline, so ~4 h with --compare_with; the Inception features of the 1.28 M ImageNet training
images take another ~20-30 min once (then the cached statistics). `--estimate_only` replaces this estimate with
a measured one (it runs one batch).

The protocol differs from the paper's in one known way: diffusers' DiTPipeline drops the learned variance
channels and samples with the scheduler's fixed variance (DDPM here, `--sampler ddpm`), while DiT's and SADM's
numbers come from ADM's sampler with the learned variance. Absolute FIDs are therefore not the paper's 2.27 /
1.58; the base and the fine-tune, sampled alike with the same seeds, are comparable with each other. The digits
study's evaluation (benchmarks/sadm_study.py) is this command at toy scale. Nothing here has run on a GPU yet.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLOPS_PER_FORWARD = {"DiT-XL/2-256": 118.6e9}  # the DiT paper's Table 4 (Gflops of one forward at 256 px)


def analytic_hours(num_samples: int, steps: int, guidance: bool, tflops: float = 990e12 * 0.4) -> float:
    forwards = num_samples * steps * (2 if guidance else 1)
    return forwards * FLOPS_PER_FORWARD["DiT-XL/2-256"] / tflops / 3600


def measure(pipeline: str, steps: int, batch: int, guidance_scale: float, dtype: str, sampler: str) -> float:
    """Seconds per image on this device, from one batch after one warm-up batch."""
    import torch

    from sadm_finetune.evaluation.evaluate import load_pipeline, use_sampler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = use_sampler(load_pipeline(pipeline, "--pipeline", device, dtype), sampler)
    labels = list(range(batch))
    pipe(class_labels=labels, num_inference_steps=2, guidance_scale=guidance_scale, output_type="np")
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np")
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="the fine-tuned pipeline (folder or Hub id)")
    p.add_argument("--compare_with", default=None, help="the base pipeline, sampled with the same seeds and labels")
    p.add_argument("--reference_dir", default=None, help="ImageNet-style folder of real images (one per class)")
    p.add_argument("--reference_stats_cache", default=None, help=".npz of the reference's Inception statistics")
    p.add_argument("--num_samples", type=int, default=50_000)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--sampler", default="ddpm", choices=("pipeline", "ddpm", "euler"))
    p.add_argument("--guidance_scale", type=float, default=1.5)
    p.add_argument("--batch_size", type=int, default=125)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", default="inception", help="the feature network (inception for the paper's FID)")
    p.add_argument("--output_json", default="benchmarks/results/paper_eval.json")
    p.add_argument("--estimate_only", action="store_true", help="time one batch and print the expected cost")
    args = p.parse_args(argv)

    guidance = args.guidance_scale > 1
    pipes = 2 if args.compare_with else 1
    print(f"analytic estimate (DiT-XL/2, H200 at 40% of bf16 peak): {analytic_hours(args.num_samples, args.steps, guidance) * pipes:.1f} h "
          f"for {pipes} pipeline(s) x {args.num_samples} samples x {args.steps} steps")
    if args.estimate_only:
        per_image = measure(args.pipeline, args.steps, min(args.batch_size, 16), args.guidance_scale, args.dtype,
                            args.sampler)
        hours = per_image * args.num_samples * pipes / 3600
        print(f"measured: {per_image:.3f} s per image -> {hours:.1f} h for {pipes} pipeline(s) x {args.num_samples} "
              "samples (sampling only; add the reference statistics once)")
        return 0
    if not args.reference_dir:
        p.error("--reference_dir is needed for FID (its statistics are cached in --reference_stats_cache)")
    if args.num_samples % args.num_classes:
        p.error(f"--num_samples {args.num_samples} is not a multiple of --num_classes {args.num_classes}")
    from sadm_finetune.evaluation.evaluate import main as sadm_eval

    flags = ["--pipeline", args.pipeline, "--features", args.features, "--samples_per_class",
             str(args.num_samples // args.num_classes), "--num_inference_steps", str(args.steps), "--sampler",
             args.sampler, "--guidance_scale", str(args.guidance_scale), "--batch_size", str(args.batch_size),
             "--dtype", args.dtype, "--seed", str(args.seed), "--output_json", args.output_json, "--probe_images", "0",
             "--reference_dir", args.reference_dir]
    if args.reference_stats_cache:
        flags += ["--reference_stats_cache", args.reference_stats_cache]
    if args.compare_with:
        flags += ["--compare_with", args.compare_with]
    return sadm_eval(flags)


if __name__ == "__main__":
    raise SystemExit(main())
