"""Pair two arms of the method study by seed across its reports, on every draw both were sampled with.

Every `_eval_noise` report of `sadm_study.py` keeps each checkpoint's FID per draw ("fid": "<regime>/<arm>/seed<N>"
-> {draw: FID}), and every study report each run's FID on the study's own draw (ddim25-s1234; a stem stands for both
files, those that exist), so an arm of one report pairs with an arm of another where both came from one chain (the same
base and first stage: run in one work dir, or rebuilt bit for bit, which a checkpoint both reports hold confirms).
Nothing is trained, sampled or evaluated again. Where two reports hold the same checkpoint, their FIDs must agree
(to 1e-6): if they do not, the reports come from different chains and pairing them would mix two draws of the
whole pipeline, so the script refuses.

    python benchmarks/pair_reports.py --regime transfer-6m-full-raw-lr1e-3-stage2 \\
        --reports length_study_6m_full_raw_lr1e-3_stage2_0to9 length_study_6m_full_raw_lr1e-3_stage2_bands \\
        --pairs full-sadm+sddit-0.5-low-t:full-sadm+sddit-0.5 full-sadm+sddit-0.5-low-t:full-sadm \\
        --output length_study_6m_full_raw_lr1e-3_stage2_bands_cross

writes benchmarks/results/<output>.json: per pair and draw, arm minus other paired over the seeds both have (mean,
95% Student-t interval, n, the differences), other's mean FID over those seeds ("relative_to") and how many seeds
the arm is better on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, write_json  # noqa: E402
from sadm_study import STUDY_DRAW, pair_on_draw  # noqa: E402

AGREE = 1e-6  # the same checkpoint's FID in two reports: equal up to float printing, or another chain


def report_files(stem: str) -> list[Path]:
    """A report stem (as `sadm_study.py --output` names it) -> its `_eval_noise.json` and its study report `.json`,
    those that exist; a file name (ending in `.json`) -> that file."""
    names = [stem] if stem.endswith(".json") else [f"{stem}_eval_noise.json", f"{stem}.json"]
    paths = [RESULTS / name for name in names if (RESULTS / name).is_file()]
    if not paths:
        raise SystemExit(f"--reports: no {' or '.join(names)} in {RESULTS}; pass the stem of a committed report "
                         f"(benchmarks/results/<stem>_eval_noise.json or <stem>.json)")
    return paths


def checkpoint_fid(path: Path) -> dict[str, dict[str, float]]:
    """One report's FIDs as "<regime>/<arm>/seed<N>" -> {draw: FID}: an `_eval_noise` report's own table, or a study
    report's per-seed FID on the study's draw (every run's own evaluation)."""
    data = json.loads(path.read_text())
    if "fid" in data:
        return data["fid"]
    return {f"{regime}/{arm}/seed{seed}": {STUDY_DRAW[0]: metrics["fid"]}
            for regime, arms in data["summary"].items() for arm, summary in arms.items()
            for seed, metrics in summary["per_seed"].items()}


def merged_fid(paths: list[Path]) -> dict[tuple[str, str, int], dict[str, float]]:
    """(regime, arm, seed) -> {draw: FID} over all reports; SystemExit where two reports disagree on a checkpoint."""
    fid: dict[tuple[str, str, int], dict[str, float]] = {}
    source: dict[tuple[str, str, int, str], Path] = {}
    for path in paths:
        for key, draws in checkpoint_fid(path).items():
            regime, arm, seed = key.rsplit("/", 2)
            checkpoint = (regime, arm, int(seed.removeprefix("seed")))
            for draw, value in draws.items():
                known = fid.get(checkpoint, {}).get(draw)
                if known is not None and abs(known - value) > AGREE:
                    raise SystemExit(f"--reports: {key} on {draw} is {known} in {source[(*checkpoint, draw)].name} "
                                     f"but {value} in {path.name}: the reports come from different chains and "
                                     f"cannot be paired by seed")
                fid.setdefault(checkpoint, {})[draw] = value
                source.setdefault((*checkpoint, draw), path)
    return fid


def pair(fid: dict, regime: str, arm: str, other: str) -> dict[str, dict]:
    """Per draw both arms have: arm minus other over the seeds both were drawn on (sadm_study.pair_on_draw), with
    those seeds and how many of them the arm is better on."""
    out = {}
    draws = sorted({d for (r, a, _), v in fid.items() if r == regime and a == arm for d in v})
    seeds = sorted(s for r, a, s in fid if r == regime and a == arm)
    for draw in draws:
        both, ci = pair_on_draw(fid, regime, arm, other, draw, seeds)
        if ci is not None:
            out[draw] = {**ci, "seeds": both, "better": sum(d < 0 for d in ci["diffs"])}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regime", required=True, help="the study regime both arms belong to")
    parser.add_argument("--reports", nargs="+", required=True,
                        help="report stems (or file names) under benchmarks/results/")
    parser.add_argument("--pairs", nargs="+", required=True, help="arm:other, arm minus other")
    parser.add_argument("--output", required=True, help="stem of the JSON written under benchmarks/results/")
    args = parser.parse_args(argv)
    pairs = []
    for spec in args.pairs:
        arm, sep, other = spec.partition(":")
        if not sep or not arm or not other:
            raise SystemExit(f"--pairs: {spec!r} is not arm:other; pass e.g. full-sadm:full-plain")
        pairs.append((arm, other))
    paths = [path for stem in args.reports for path in report_files(stem)]
    fid = merged_fid(paths)
    result: dict = {"regime": args.regime, "reports": [p.name for p in paths], "pairs": {}}
    for arm, other in pairs:
        for name in (arm, other):
            if not any(r == args.regime and a == name for r, a, _ in fid):
                raise SystemExit(f"--pairs: no report holds {args.regime}/{name}; add the report that does to "
                                 f"--reports")
        result["pairs"][f"{arm} - {other}"] = pair(fid, args.regime, arm, other)
    path = write_json(RESULTS / f"{args.output}.json", result, indent=2, newline=True)
    for name, draws in result["pairs"].items():
        for draw, ci in draws.items():
            share = 100 / ci["relative_to"]
            print(f"{name:55s} {draw:13s} n={ci['n']:2d} {ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}] "
                  f"{share * ci['mean']:+.1f}% [{share * ci['low']:+.1f}%, {share * ci['high']:+.1f}%] "
                  f"better on {ci['better']}/{ci['n']}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
