"""SADM's gain against the base's offset from its own average: the dose-response of the 23.1 M offset bases.

`sadm_study.py --length` fine-tunes 23.1 M bases that lie on the line through continue-24m-ema-constant (an EMA, the
average of a constant-LR run) and continue-24m (that run's raw iterate): the base is average + scale x (iterate -
average), with scale 0 (the average itself), 0.5, 1 (the iterate), 2 and -1 (the offset turned around; OFFSET_BASES).
Each regime's `_eval_noise` report pairs SADM with plain at SADM's compute on every draw it made (five paired seeds;
the study's DDIM 25 draw and DDPM 50). This script reads those pairings from benchmarks/results/, nothing is trained,
sampled or paired again, and writes per base SADM - plain at equal compute as a share of plain's FID (the mean
paired difference over plain's mean FID, with its 95% Student-t interval) on each draw, and the plot of that share
against the scale:

    python benchmarks/offset_dose.py   # -> benchmarks/results/offset_dose_24m.json and .png

A base rebuilt on another machine is a new draw of the whole chain (seeded CPU training repeats bit for bit on one
machine only), so each point names its chain: points of one chain share their average and iterate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, write_json  # noqa: E402
from sadm_study import equal_compute_key  # noqa: E402

# (scale, chain, regime, report stem under benchmarks/results): the offset bases, in the order of the scale
POINTS = (
    (-1.0, "committed", "continue-24m-mirrored-5to9", "length_study_24m_mirrored_5to9"),
    (0.0, "committed", "continue-24m-ema-constant-5to9", "length_study_24m_ema_constant_5to9"),
    (0.5, "committed", "continue-24m-half-offset-5to9", "length_study_24m_half_offset_5to9"),
    (1.0, "committed", "continue-24m-5to9", "length_study_24m_5to9"),
    (1.0, "rebuilt", "continue-24m-5to9", "length_study_24m_5to9_rebuilt"),
    (2.0, "rebuilt", "continue-24m-double-offset-5to9", "length_study_24m_double_offset_5to9"),
)
STUDY_DRAW = "ddim25-s1234"  # the report's own draw (eval.json): DDIM 25, sampling seed 1234, 1,000 samples
DRAWS = (STUDY_DRAW, "ddpm50-s1234")


def point(results: Path, regime: str, stem: str) -> dict[str, dict | None]:
    """draw -> SADM - plain at SADM's compute as the study paired them (sadm_study.eval_noise_result: the paired
    difference over the seeds both were drawn with, its 95% interval and plain's mean FID over those seeds,
    ``relative_to``), with the interval also as a share of that mean (``pct``, in %); None for a draw not made."""
    noise = results / f"{stem}_eval_noise.json"
    if not noise.is_file():
        raise SystemExit(f"{noise} is missing: run its block with benchmarks/sadm_study.py --length --eval_noise "
                         f"--draws ddpm50-s1234 --only {regime}/sadm,{regime}/plain-equal-compute "
                         "(see docs/sadm-study.md), or drop it from POINTS")
    key = equal_compute_key(regime, "sadm", "plain-equal-compute")
    pairs = json.loads(noise.read_text())["equal_compute"].get(key) or {}
    if not any(pairs.values()):
        raise SystemExit(f"{noise} pairs no sadm with plain-equal-compute of {regime}: it is not that regime's report")
    return {d: None if not (ci := pairs.get(d)) else
            {**ci, "pct": {k: 100 * ci[k] / ci["relative_to"] for k in ("mean", "low", "high")}} for d in DRAWS}


def dose(results: Path) -> dict:
    return {"command": "python benchmarks/offset_dose.py",
            "what": "SADM - plain at SADM's compute (515 steps) on 23.1 M bases at average + scale x (raw iterate - "
                    "average), fine-tuned on digits 5-9; per draw the paired FID difference, its 95% interval over "
                    "training seeds, plain's mean FID over those seeds (relative_to) and the share of it (pct)",
            "draws": list(DRAWS),
            "points": [{"scale": scale, "chain": chain, "regime": regime, "report": f"{stem}_eval_noise.json",
                        "sadm_minus_plain_equal_compute": point(results, regime, stem)}
                       for scale, chain, regime, stem in POINTS]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, draw in enumerate(result["draws"]):
        for chain, marker in (("committed", "o"), ("rebuilt", "s")):
            pts = [(p["scale"], p["sadm_minus_plain_equal_compute"][draw]) for p in result["points"]
                   if p["chain"] == chain and p["sadm_minus_plain_equal_compute"][draw]]
            if not pts:
                continue
            xs = [x + (i - 0.5) * 0.05 + (0.12 if chain == "rebuilt" else 0.0) for x, _ in pts]  # side by side
            ys = [c["pct"]["mean"] for _, c in pts]
            err = [[c["pct"]["mean"] - c["pct"]["low"] for _, c in pts], [c["pct"]["high"] - c["pct"]["mean"]
                                                                          for _, c in pts]]
            ax.errorbar(xs, ys, yerr=err, fmt=marker, color=f"C{i}", capsize=3, label=f"{draw}, {chain} chain")
    ax.axhline(0, color="gray", linestyle="--")
    ax.set_xlabel("base = average + scale x (raw iterate - average)")
    ax.set_ylabel("SADM - plain at equal compute (% of plain's FID)")
    ax.set_title("23.1 M, continued training on digits 5-9: SADM's gain against the base's offset", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of the study's reports")
    parser.add_argument("--output", type=Path, default=RESULTS / "offset_dose_24m.json")
    args = parser.parse_args(argv)
    result = dose(args.results)
    path = write_json(args.output, result, indent=2, newline=True)
    try:
        plot(result, path.with_suffix(".png"))
    except ImportError:  # matplotlib is not a dependency of the toolkit
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    for p in result["points"]:
        cells = []
        for draw, c in p["sadm_minus_plain_equal_compute"].items():
            cells.append(f"{draw}: —" if not c else f"{draw}: {c['pct']['mean']:+.1f}% [{c['pct']['low']:+.1f}%, "
                                                    f"{c['pct']['high']:+.1f}%] (n={c['n']})")
        print(f"scale {p['scale']:+.1f} ({p['chain']}, {p['regime']}): " + "; ".join(cells))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
