"""Where each term pushes: every loss term's share of the denoiser's gradient per noise band (`--grad_bands`).

One training run in the study's continue regime (benchmarks/sadm_study.py: the under-trained continue base, the
regime's recipe EMA 0.999 + warm-up + cosine, builtin digits, cached latents), 300 steps at seed 0, with SADM (the
demo recipe's lambda 0.01), SD-DiT at lambda 0.5 and REPA at lambda 0.1 together (the study's settings of each), and
`--grad_bands 4 --grad_bands_every 10`: for each of 4 timestep bands and each term (the denoising loss as
`diffusion`), the norm over the denoiser's trainable weights of the gradient the band's samples contribute through the
weighted term, and its share of the band's sum (train/diagnostics.py). The tensorboard event file is read back and
averaged over the measured steps; results/term_grad_bands.json.

    python scripts/make_digits_encoder.py --output_dir runs/digits-encoder --steps 400 --num_threads 1  # REPA's
    python benchmarks/term_grad_bands.py --work_dir runs/study     # ~10 min on 2 loaded CPU cores (one thread)

The continue base is the study's (`--work_dir`/bases/continue, built by sadm_study.py; `--base` to point elsewhere).
A finished run is not retrained (delete its folder to rerun); `--report_only` rereads it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import DEMO_RECIPE, RESULTS, ROOT, offline_env, train_once, write_json  # noqa: E402

BANDS, EVERY, STEPS, SEED = 4, 10, 300, 0
TERMS = ("diffusion", "sadm", "sddit", "repa")
EMA_COSINE = ["--use_ema", "--ema_decay", "0.999", "--lr_scheduler", "cosine", "--lr_warmup_steps", "50"]
SDDIT = ["--sddit_weight", "0.5", "--sddit_encoder_depth", "2", "--sddit_head_dim", "256",
         "--sddit_head_hidden_dim", "256"]


def repa(encoder: Path) -> list[str]:
    return ["--repa_weight", "0.1", "--repa_encoder", str(encoder), "--repa_depth", "2", "--repa_projector_dim", "256",
            "--repa_encoder_resolution", "32"]


def band_labels(bands: int = BANDS, total: int = 1000) -> list[str]:
    return [f"{k * total // bands}-{(k + 1) * total // bands - 1}" for k in range(bands)]


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the run's tensorboard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(logdir.rglob("events.out.tfevents*"))
    if not files:
        raise SystemExit(f"no tensorboard event file under {logdir}")
    out: dict[str, list[tuple[int, float]]] = {}
    for folder in sorted({f.parent for f in files}):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return out


def nan_mean(values: list[float]) -> float | None:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else None


def summarise(scalars: dict[str, list[tuple[int, float]]], first_step: int = 0) -> dict:
    """Per band and term: the mean norm and mean share over the measured steps >= first_step (empty bands skipped),
    the share of the mean norms, and how many steps measured the band."""
    out: dict = {"norm": {}, "share": {}, "share_of_mean_norms": {}, "measured_steps": []}
    for k in range(BANDS):
        norms = {t: nan_mean([v for s, v in scalars.get(f"grad_band{k}_{t}", []) if s >= first_step]) for t in TERMS}
        shares = {t: nan_mean([v for s, v in scalars.get(f"grad_share_band{k}_{t}", []) if s >= first_step])
                  for t in TERMS}
        total = sum(v for v in norms.values() if v is not None)
        for t in TERMS:
            out["norm"].setdefault(t, []).append(norms[t])
            out["share"].setdefault(t, []).append(shares[t])
            out["share_of_mean_norms"].setdefault(t, []).append(norms[t] / total if norms[t] is not None and total
                                                                else None)
        steps = [s for s, v in scalars.get(f"grad_band{k}_diffusion", []) if s >= first_step and not math.isnan(v)]
        out["measured_steps"].append(len(steps))
    return out


def markdown(result: dict) -> str:
    whole = result["all_measured_steps"]
    lines = ["| timestep band | " + " | ".join(f"‖g‖ {t}" for t in TERMS) + " | " +
             " | ".join(f"share {t}" for t in TERMS) + " |", "|---" * (1 + 2 * len(TERMS)) + "|"]
    for k, label in enumerate(result["bands"]):
        norms = [f"{whole['norm'][t][k]:.2e}" for t in TERMS]
        shares = [f"{100 * whole['share'][t][k]:.1f}%" for t in TERMS]
        lines.append(f"| {label} | " + " | ".join(norms) + " | " + " | ".join(shares) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "study",
                        help="the study's folder: bases/continue and latent_cache are read from it")
    parser.add_argument("--base", type=Path, default=None, help="the continue base (default: WORK_DIR/bases/continue)")
    parser.add_argument("--encoder", type=Path, default=ROOT / "runs" / "digits-encoder", help="REPA's encoder")
    parser.add_argument("--run_dir", type=Path, default=None,
                        help="the training run's folder (default: WORK_DIR/runs/continue/grad-bands-...)")
    parser.add_argument("--output", type=Path, default=RESULTS / "term_grad_bands.json")
    parser.add_argument("--report_only", action="store_true", help="only reread the finished run")
    args = parser.parse_args()
    base = args.base or args.work_dir / "bases" / "continue"
    for path, fix in ((base / "model_index.json", "build it with benchmarks/sadm_study.py or pass --base"),
                      (args.encoder / "config.json", "build it with scripts/make_digits_encoder.py or pass --encoder")):
        if not path.is_file():
            raise SystemExit(f"{path} not found; {fix}")
    out = args.run_dir or args.work_dir / "runs" / "continue" / f"grad-bands-sadm+sddit-0.5+repa-0.1-seed{SEED}"
    flags = ["--config", str(DEMO_RECIPE), "--pretrained", str(base), "--dataset_name", "builtin:digits",
             "--output_dir", str(out), "--overwrite_output_dir", "--seed", str(SEED), "--max_train_steps", str(STEPS),
             "--report_to", "tensorboard", "--validation_inference_steps", "10", "--num_validation_images", "2",
             "--cache_latents", "--latent_cache_dir", str(args.work_dir / "latent_cache"), *EMA_COSINE,
             *SDDIT, *repa(args.encoder), "--grad_bands", str(BANDS), "--grad_bands_every", str(EVERY)]
    seconds = None
    if not args.report_only:
        seconds = train_once(flags, out, "training with --grad_bands", offline_env(threads=1))
        print(f"trained in {seconds:.0f} s" if seconds is not None else f"{out} already trained", flush=True)
    if seconds is None and args.output.is_file():  # an earlier invocation trained it: keep its time
        seconds = json.loads(args.output.read_text()).get("train_seconds")
    scalars = read_scalars(out / "logs")
    result = {
        "command": "train_sadm.py " + " ".join(str(f) for f in flags).replace(str(base), "<continue base>")
        .replace(str(ROOT) + "/", "").replace(str(out), "<run_dir>")
        .replace(str(args.encoder), "<digits encoder>").replace(str(args.work_dir), "<work_dir>"),
        "what": "per timestep band (band 0 the cleanest) and term: the L2 norm over the denoiser's trainable weights "
                "of d(lambda_term * sum over the band's samples of the per-sample loss / B)/d theta (SADM: the "
                "gradient of L_S with the other samples' x0_hat detached), and its share of the band's sum; means "
                "over the measured steps (every 10th update, logged at steps 1, 11, ..., 291) holding samples of the "
                "band",
        "train_seconds": seconds,
        "machine": "2 shared CPU cores (load ~3), one torch thread",
        "bands": band_labels(),
        "terms": list(TERMS),
        "all_measured_steps": summarise(scalars),
        "steps_101_300": summarise(scalars, first_step=101),
    }
    write_json(args.output, result)
    print(markdown(result))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
