#!/usr/bin/env python
"""How low can the study's FID go? The floor of a finite-sample FID against the study's reference.

An FID from n generated samples against a reference of N images is biased upwards by about c (1/n + 1/N) even
when the generator draws from the data distribution itself (the bias of a Gaussian fit to finite samples,
linear in 1/n: Chong & Forsyth, "Effectively Unbiased FID", CVPR 2020). Near that floor, paired FID differences
shrink whatever the models do, so a small gap between two arms on a sampler that reaches the floor means less
than the same gap far above it. This script measures the floor on the reference's own features (an .npz that
`sadm-eval --reference_stats_cache` writes, with its features and labels):

  memorizer    n images drawn from the reference itself (class-balanced, without replacement) against the whole
               reference: a model that reproduces its training set
  bootstrap    the same with replacement
  split halves the reference split at random into two disjoint sets of n each, FID of one against the other, for
               several n; c is fitted to FID = c (2/n) over those sizes (the per-size c shows whether 1/n holds)
  independent  c (1/n + 1/N): the expected FID of n fresh draws from the data distribution against the fixed
               reference of N, for the study's 1,000 and 5,000 samples (an extrapolation from the fitted c)
  training set with --training_set: n draws (class-balanced, with replacement) from the images a model was
               fine-tuned on, against the whole reference: the FID of a model that reproduces its few-shot training
               set (transfer trains on 150 of the 896 digits 5-9 it is judged against)

    python benchmarks/fid_floor.py --reference_stats runs/study/reference-continue-24m.npz   # all 1,797 digits
    python benchmarks/fid_floor.py --reference_stats runs/study/reference-transfer-24m.npz --halves 100 200 400 \
        --training_set runs/study/data/digits-5-9-few
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py
from harness import ROOT, write_json  # noqa: E402

sys.path.insert(0, str(ROOT))
from sadm_finetune.evaluation.metrics import feature_statistics, frechet_distance  # noqa: E402


def fid_of(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(features), mu, sigma)


def balanced(labels: np.ndarray, per_class: int, replace: bool, rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=replace)
                           for c in np.unique(labels)])


def balanced_draws(features: np.ndarray, labels: np.ndarray, per_class: int, replace: bool, mu: np.ndarray,
                   sigma: np.ndarray, repeats: int, rng: np.random.Generator) -> dict:
    """Mean and sd of the FID against (mu, sigma) of `repeats` class-balanced draws from `features`."""
    v = [fid_of(features[balanced(labels, per_class, replace, rng)], mu, sigma) for _ in range(repeats)]
    return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1))}


def floors(features: np.ndarray, labels: np.ndarray, samples: list[int], halves: list[int], repeats: int,
           seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    mu, sigma = feature_statistics(features)
    n_ref = len(features)
    counts = np.unique(labels, return_counts=True)[1]  # the classes present, whatever their ids (transfer: 5-9)
    if max(halves) * 2 > n_ref:
        raise ValueError(f"--halves: {max(halves)} per half needs {2 * max(halves)} reference images, it has {n_ref}")
    out: dict = {"reference_images": n_ref, "repeats": repeats, "memorizer": {}, "bootstrap": {}, "split_halves": {}}
    for n in samples:
        per = n // len(counts)
        for name, replace in (("memorizer", False), ("bootstrap", True)):
            if not replace and per > counts.min():
                continue  # more per class than the reference holds
            out[name][str(n)] = balanced_draws(features, labels, per, replace, mu, sigma, repeats, rng)
    for n in halves:
        v = []
        for _ in range(repeats):
            p = rng.permutation(n_ref)
            a, b = features[p[:n]], features[p[n:2 * n]]
            v.append(fid_of(a, *feature_statistics(b)))
        out["split_halves"][str(n)] = {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)),
                                       "c": float(np.mean(v)) * n / 2}
    x = np.array([2 / n for n in halves])
    y = np.array([out["split_halves"][str(n)]["mean"] for n in halves])
    c = float(x @ y / (x @ x))  # least squares through the origin
    out["c"] = c
    out["independent"] = {str(n): c * (1 / n + 1 / n_ref) for n in samples}
    return out


def training_set_floor(train_features: np.ndarray, train_labels: np.ndarray, features: np.ndarray,
                       samples: list[int], repeats: int, seed: int = 0) -> dict:
    """FID of n class-balanced draws (with replacement) from a training set's features against the reference."""
    rng = np.random.default_rng(seed)
    mu, sigma = feature_statistics(features)
    classes = len(np.unique(train_labels))
    return {"images": len(train_features),
            "draws": {str(n): balanced_draws(train_features, train_labels, n // classes, True, mu, sigma, repeats, rng)
                      for n in samples}}


def dataset_features(dataset: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """A labelled `datasets` set's features in the reference's feature space (its cache key names the extractor and
    the resolution; the study's references use the bundled digits classifier)."""
    import re
    from types import SimpleNamespace

    from sadm_finetune.evaluation.features import build_feature_extractor
    from sadm_finetune.evaluation.reference import open_reference

    extractor = build_feature_extractor("digits", batch_size=250)
    if not key.startswith(f"features={extractor.name};"):
        raise SystemExit(f"--training_set: the reference's features are not the digits classifier's ({key}); "
                         "measure the training-set floor against a study reference")
    source = SimpleNamespace(reference_dir=None, reference_dataset=dataset, reference_split="train",
                             image_column="image", label_column="label")  # sadm-eval's defaults
    reference = open_reference(source)
    if reference.labels is None:
        raise SystemExit(f"--training_set: {dataset} has no label column; the draws are class-balanced")
    resolution = int(re.search(r"resolution=(\d+)", key).group(1))
    return extractor(reference.load(np.arange(reference.num_images), resolution)), reference.labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference_stats", default=str(ROOT / "runs" / "study" / "reference-continue-24m.npz"),
                        help="an .npz from sadm-eval --reference_stats_cache (its features and labels)")
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--halves", type=int, nargs="+", default=[150, 300, 600, 898])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--training_set", default=None,
                        help="a labelled `datasets` folder the models trained on: the FID of reproducing it")
    parser.add_argument("--output", default=None,
                        help="default: benchmarks/results/fid_floor_<the .npz's name>.json")
    args = parser.parse_args()
    path = Path(args.reference_stats)
    if not path.is_file():
        raise SystemExit(f"--reference_stats: {path} does not exist; run the study (it writes reference-<regime>.npz "
                         "into its --work_dir) or sadm-eval --reference_stats_cache first")
    data = np.load(path, allow_pickle=False)
    if "features" not in data.files or "labels" not in data.files:
        raise SystemExit(f"--reference_stats: {path} has no features and labels; write it with sadm-eval "
                         "--reference_stats_cache on a labelled reference")
    try:
        result = floors(data["features"], data["labels"], args.samples, args.halves, args.repeats)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.training_set:
        train_features, train_labels = dataset_features(args.training_set, str(data["key"]))
        result["training_set"] = training_set_floor(train_features, train_labels, data["features"], args.samples,
                                                    args.repeats)
        result["training_set"]["dataset"] = Path(args.training_set).name
    result["reference_stats"] = path.name
    args.output = args.output or str(ROOT / "benchmarks" / "results" / f"fid_floor_{path.stem}.json")
    write_json(args.output, result, indent=2, newline=True)
    for name in ("memorizer", "bootstrap"):
        for n, v in result[name].items():
            print(f"{name:10s} n={n:>5s}: FID {v['mean']:.3f} (sd {v['sd']:.3f})")
    for n, v in result.get("training_set", {}).get("draws", {}).items():
        print(f"training set n={n:>5s} drawn from its {result['training_set']['images']} images: FID {v['mean']:.3f} "
              f"(sd {v['sd']:.3f})")
    for n, v in result["split_halves"].items():
        print(f"split halves {n:>4s} vs {n:>4s}: FID {v['mean']:.3f} (sd {v['sd']:.3f}), c = {v['c']:.0f}")
    for n, v in result["independent"].items():
        print(f"independent  n={n:>5s} vs the reference's {result['reference_images']}: expected FID {v:.3f} "
              f"(c = {result['c']:.0f})")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
