"""Does SADM help? Fine-tune the bundled demo base on digits with SADM and without (structure_weight 0),
equal steps and batch, several seeds; evaluate every output the same way; print mean ± spread.

    python benchmarks/quality_digits.py                         # default SADM vs plain, 3 seeds
    python benchmarks/quality_digits.py --variants sweep --seeds 0   # the option sweep, one seed each

Every run goes through the real command line (`train_sadm.py --config configs/demo.yaml ...`) and
every output through `sadm_finetune.evaluation.evaluate` (FID / KID / precision / recall in the bundled digits
classifier's feature space, label accuracy of class-conditional samples). Results: a JSON file and a
PNG plot under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also when imported as benchmarks.quality_digits
from harness import (DEMO_BASE as BASE, DEMO_RECIPE, ROOT, offline_env, summarize, train_once,  # noqa: E402
                     write_json)

# name -> extra flags on top of configs/demo.yaml (which holds the project's SADM defaults).
VARIANTS: dict[str, list[str]] = {
    "plain": ["--structure_weight", "0"],
    "sadm-default": [],
}
SWEEP: dict[str, list[str]] = {
    "lambda-0.001": ["--structure_weight", "0.001"],
    "lambda-0.05": ["--structure_weight", "0.05"],
    "cutoff-t300": ["--timestep_weighting", "cutoff"],
    "disc-lr-2e-5": ["--disc_learning_rate", "2e-5"],
    "disc-warmup-200": ["--disc_warmup_steps", "200"],
    "no-spectral-norm": ["--no_disc_spectral_norm"],
    "relation-rbf": ["--relation", "rbf"],
    "distance-kl": ["--distance", "kl"],
    "disc-every-4": ["--disc_every", "4"],
    "gradient-penalty": ["--disc_gradient_penalty", "1.0"],
}
METRICS = ("fid", "kid_mean", "precision", "recall", "label_accuracy")


def train(name: str, flags: list[str], seed: int, steps: int, work: Path) -> Path:
    out = work / f"{name}-seed{seed}"
    # a run finished earlier is reused (delete the folder to retrain)
    seconds = train_once(["--config", str(DEMO_RECIPE), "--output_dir", str(out), "--overwrite_output_dir", "--seed",
                          str(seed), "--max_train_steps", str(steps), "--report_to", "none",
                          "--validation_inference_steps", "10", "--num_validation_images", "2", *flags],
                         out, f"training {name} seed {seed}", offline_env(), error=SystemExit)
    if seconds is not None:
        print(f"  trained {name} seed {seed} in {seconds:.0f} s", flush=True)
    return out


def evaluate(pipeline: Path, args: argparse.Namespace, cache: Path) -> dict:
    from sadm_finetune.evaluation.evaluate import EvalConfig, evaluate_pipeline

    config = EvalConfig(
        pipeline=str(pipeline), reference_dataset="builtin:digits", features="digits", classifier="digits",
        samples_per_class=args.samples_per_class, num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, seed=1234, batch_size=200, reference_stats_cache=str(cache),
    )
    return evaluate_pipeline(config)["metrics"]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(names) + 4), 4))
    for ax, metric in zip(axes, ("fid", "label_accuracy")):
        for i, name in enumerate(names):
            values = [r[metric] for r in results["runs"][name].values()]
            ax.scatter([i] * len(values), values, color="tab:blue", alpha=0.7)
            ax.errorbar(i + 0.15, statistics.fmean(values), yerr=statistics.stdev(values) if len(values) > 1 else 0,
                        fmt="o", color="black", capsize=4)
        if metric in results["base"]:
            ax.axhline(results["base"][metric], color="gray", linestyle="--", label="base (before fine-tuning)")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{metric} per seed (dots) and mean ± std")
    fig.suptitle(f"digits, {results['steps']} steps at batch 32, {results['num_samples']} samples; features: "
                 "digits classifier", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="main", help="main (default vs plain), sweep, or comma-separated names")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--samples_per_class", type=int, default=200)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "quality"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "quality_digits"))
    args = parser.parse_args()
    if not (BASE / "model_index.json").is_file():
        raise SystemExit(f"the demo base {BASE} is missing: run scripts/make_demo_base.py")
    catalogue = {**VARIANTS, **SWEEP}
    if args.variants == "main":
        chosen = dict(VARIANTS)
    elif args.variants == "sweep":
        chosen = {"plain": VARIANTS["plain"], "sadm-default": [], **SWEEP}
    else:
        unknown = [n for n in args.variants.split(",") if n not in catalogue]
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; choose from {sorted(catalogue)}")
        chosen = {n: catalogue[n] for n in args.variants.split(",")}
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "digits_reference_stats.npz"
    print(f"evaluating the base {BASE.name}", flush=True)
    results = {"steps": args.steps, "seeds": args.seeds, "num_samples": 10 * args.samples_per_class,
               "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
               "base": evaluate(BASE, args, cache), "variants": {n: f for n, f in chosen.items()}, "runs": {}}
    for name, flags in chosen.items():
        results["runs"][name] = {}
        for seed in args.seeds:
            out = train(name, flags, seed, args.steps, work)
            results["runs"][name][str(seed)] = evaluate(out, args, cache)
    results["summary"] = {
        name: {m: summarize([r[m] for r in runs.values()], range_=True) for m in METRICS
               if m in next(iter(runs.values()))}
        for name, runs in results["runs"].items()
    }
    output = Path(args.output)
    write_json(output.with_suffix(".json"), results, indent=2)
    plot(results, output.with_suffix(".png"))

    print("\nbase: " + ", ".join(f"{m} {results['base'][m]:.4g}" for m in METRICS if m in results["base"]))
    header = f"{'variant':<18}" + "".join(f"{m:>22}" for m in METRICS)
    print(header)
    print("-" * len(header))
    for name, summary in results["summary"].items():
        cells = "".join(f"{summary[m]['mean']:>13.4g} ± {summary[m]['std']:<6.2g}" if m in summary else f"{'':>22}"
                        for m in METRICS)
        print(f"{name:<18}{cells}")
    print(f"\nwrote {output.with_suffix('.json')} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
