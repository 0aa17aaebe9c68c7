"""What the study's runs logged while training: per regime, an arm's training scalars, averaged over step windows,
then over its seeds (mean, sd and each seed's value).

The study (benchmarks/sadm_study.py) trains every run with `--report_to tensorboard`, so each run folder holds the
scalars of all its steps: SADM's `structure_loss_g` (the distance between the relation matrices of z0 and x0_hat
that the discriminator has learned to find, L_S itself: the size of the denoiser's structure push), `d_pair_cos`
(1: D maps each x0_hat where it maps its own z0), `structure_gap_fixed` (the gap a fixed encoder sees; logged by
plain runs too) and `loss_diffusion`. Nothing is trained or sampled; this reads the runs a study left in its
`--work_dir`:

    python benchmarks/study_logs.py --work_dir runs/study --regimes continue-24m-5to9 continue-24m-ema-5to9 \\
        --output benchmarks/results/study_logs_24m.json

A regime's arm is `<arm>-seed<k>` or, in the transfer regimes, `full-<arm>-seed<k>`; every seed found is read.
`--reports` adds each regime's paired gain from the study's reports (SADM against plain at SADM's compute, per seed,
in % of plain's FID) and, per window, the Pearson correlation over the (regime, seed) pairs of `--correlate`
(default: every regime with a gain) between the first tag and that gain.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, ROOT, write_json  # noqa: E402
from term_grad_bands import read_scalars  # noqa: E402

TAGS = ("structure_loss_g", "d_pair_cos", "structure_gap_fixed", "loss_diffusion")
WINDOWS = ("1-100", "101-300", "301-500")


def parse_window(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    if not (first.isdigit() and last.isdigit() and 0 < int(first) <= int(last)):
        raise SystemExit(f"--windows: {text!r} is not FIRST-LAST (steps, 1-based, FIRST <= LAST), e.g. 301-500")
    return int(first), int(last)


def arm_runs(work: Path, regime: str, arm: str) -> list[tuple[int, Path]]:
    """(seed, run folder) of every seed of ``arm`` in ``regime``, by seed; ``full-<arm>`` where the regime's arms
    carry transfer's prefix."""
    folder = work / "runs" / regime
    for name in (arm, f"full-{arm}"):
        runs = sorted((int(p.name.rsplit("-seed", 1)[1]), p) for p in folder.glob(f"{name}-seed*")
                      if p.name.rsplit("-seed", 1)[1].isdigit() and (p / "logs").is_dir())
        if runs:
            return runs
    raise SystemExit(f"--regimes: no run of {arm!r} (or 'full-{arm}') with logs under {folder}; "
                     "run the regime with benchmarks/sadm_study.py first or drop it")


def window_mean(points: list[tuple[int, float]], first: int, last: int) -> float | None:
    values = [v for step, v in points if first <= step <= last]
    return statistics.fmean(values) if values else None


def regime_logs(runs: list[tuple[int, Path]], tags: tuple[str, ...], windows: dict[str, tuple[int, int]]) -> dict:
    """tag -> window -> {"mean", "sd", "per_seed"} over the runs (``windows``: label -> (first, last) step; a run
    without the tag or window counts as None and is left out of mean and sd)."""
    scalars = {}
    for seed, run in runs:
        with contextlib.redirect_stderr(io.StringIO()):  # tensorboard's notice that it runs without TensorFlow
            scalars[seed] = read_scalars(run / "logs")
    out: dict = {}
    for tag in tags:
        for window, (first, last) in windows.items():
            per_seed = [window_mean(scalars[seed].get(tag, []), first, last) for seed, _ in runs]
            kept = [v for v in per_seed if v is not None]
            out.setdefault(tag, {})[window] = {
                "mean": statistics.fmean(kept) if kept else None,
                "sd": statistics.stdev(kept) if len(kept) > 1 else None, "per_seed": per_seed}
    return out


def equal_compute_gains(summaries: list[tuple[Path, dict]], regime: str, arm: str) -> dict[int, float] | None:
    """seed -> 100 (FID of ``arm`` - FID of plain at its compute) / the latter, from the first report holding the
    regime (``summaries``: each report and its summary, regime -> arm -> per_seed -> metrics); None if none holds
    it."""
    for report, summary in summaries:
        if regime not in summary:
            continue
        arms = summary[regime]
        for prefix in ("", "full-"):
            if f"{prefix}{arm}" in arms and f"{prefix}plain-equal-compute" in arms:
                ours = arms[f"{prefix}{arm}"]["per_seed"]
                plain = arms[f"{prefix}plain-equal-compute"]["per_seed"]
                return {int(s): 100 * (ours[s]["fid"] - plain[s]["fid"]) / plain[s]["fid"]
                        for s in sorted(set(ours) & set(plain), key=int)}
        raise SystemExit(f"--reports: {report} holds {regime} without {arm!r} and plain at its compute")
    return None


def correlation(result: dict, regimes: list[str], tag: str, window: str) -> dict:
    """Pearson r between ``tag`` (the window's per-seed means) and the paired gain, pooled over the regimes' seeds
    ("r"), and the same with each regime's means taken out of both ("r_within_regime": do the seeds on which D
    finds more within a regime gain more?)."""
    pairs: dict[str, list[tuple[float, float]]] = {}
    for regime in regimes:
        entry = result["regimes"][regime]
        for seed, value in zip(entry["seeds"], entry["logs"][tag][window]["per_seed"]):
            gain = (entry.get("equal_compute_gain_pct") or {}).get(str(seed))
            if value is not None and gain is not None:
                pairs.setdefault(regime, []).append((value, gain))

    def pearson(points: list[tuple[float, float]]) -> float | None:
        return statistics.correlation(*zip(*points)) if len(points) > 2 else None

    pooled = [p for points in pairs.values() for p in points]
    centred = [(x - statistics.fmean(a for a, _ in points), y - statistics.fmean(b for _, b in points))
               for points in pairs.values() for x, y in points]
    return {"r": pearson(pooled), "r_within_regime": pearson(centred), "n": len(pooled)}


def markdown(result: dict, window: str) -> str:
    tags = result["tags"]
    lines = [f"| regime (steps {window}) | n | " + " | ".join(tags) + " | SADM vs plain, equal compute |",
             "|---" * (len(tags) + 3) + "|"]
    for regime, entry in result["regimes"].items():
        cells = []
        for tag in tags:
            cell = entry["logs"][tag][window]
            cells.append("—" if cell["mean"] is None else
                         f"{cell['mean']:.4g}" + ("" if cell["sd"] is None else f" ± {cell['sd']:.2g}"))
        gains = entry.get("equal_compute_gain_pct")
        gain = "—" if not gains else f"{statistics.fmean(gains.values()):+.1f}%"
        lines.append(f"| {regime} | {len(entry['seeds'])} | " + " | ".join(cells) + f" | {gain} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "study", help="the study's folder")
    parser.add_argument("--regimes", nargs="+", required=True, help="the regimes to read, in the table's order")
    parser.add_argument("--arm", default="sadm", help="the arm to read in each regime (default: sadm)")
    parser.add_argument("--tags", nargs="+", default=list(TAGS), help="the logged scalars to average")
    parser.add_argument("--windows", nargs="+", default=list(WINDOWS), help="step windows FIRST-LAST")
    parser.add_argument("--reports", type=Path, nargs="*", default=[],
                        help="the study's report JSONs holding the regimes' per-seed FIDs (sadm_study.py --output)")
    parser.add_argument("--correlate", nargs="*", default=None,
                        help="the regimes pooled in the correlation (default: every regime with a gain)")
    parser.add_argument("--output", type=Path, default=RESULTS / "study_logs.json")
    args = parser.parse_args(argv)
    windows = {window: parse_window(window) for window in args.windows}
    for report in args.reports:
        if not report.is_file():
            raise SystemExit(f"--reports: {report} not found")
    unknown = sorted(set(args.correlate or []) - set(args.regimes))
    if unknown:
        raise SystemExit(f"--correlate: {', '.join(unknown)} not in --regimes; add them there or drop them")
    runs = {regime: arm_runs(args.work_dir, regime, args.arm) for regime in args.regimes}  # refuse before reading
    given = sys.argv[1:] if argv is None else argv
    result = {
        "command": "python benchmarks/study_logs.py " + " ".join(given).replace(str(args.work_dir), "<work_dir>"),
        "what": "per regime: the arm's logged training scalars (tensorboard), averaged over each window of steps per "
                "run, then mean, sd and per-seed values over the regime's seeds",
        "arm": args.arm, "tags": list(args.tags), "windows": list(windows),
        "regimes": {regime: {"seeds": [seed for seed, _ in found], "runs": [p.name for _, p in found],
                             "logs": regime_logs(found, tuple(args.tags), windows)}
                    for regime, found in runs.items()},
    }
    summaries = [(report, json.loads(report.read_text()).get("summary", {})) for report in args.reports]
    for regime, entry in result["regimes"].items():
        gains = equal_compute_gains(summaries, regime, args.arm)
        if gains is not None:
            entry["equal_compute_gain_pct"] = {str(seed): gain for seed, gain in gains.items()}
    pooled = args.correlate if args.correlate is not None else [
        regime for regime, entry in result["regimes"].items() if "equal_compute_gain_pct" in entry]
    if pooled:
        result["correlation"] = {"tag": args.tags[0], "regimes": pooled,
                                 "windows": {w: correlation(result, pooled, args.tags[0], w) for w in windows}}
    write_json(args.output, result)
    print(markdown(result, args.windows[-1]))
    for window, corr in result.get("correlation", {}).get("windows", {}).items():
        r, within = ("—" if v is None else f"{v:+.2f}" for v in (corr["r"], corr["r_within_regime"]))
        print(f"{args.tags[0]} (steps {window}) vs the gain, pooled over {corr['n']} runs: r = {r} "
              f"(within regimes: {within})")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
