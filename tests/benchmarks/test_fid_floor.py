"""benchmarks/fid_floor.py: the floor of a finite-sample FID, measured on the reference's own features."""

import sys

import numpy as np
import pytest
from launch import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import fid_floor  # noqa: E402


def gaussian_reference(n_per_class=400, classes=4, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    features = rng.normal(size=(len(labels), dim)) + labels[:, None] * 0.5  # class means apart
    return features, labels


def test_floors_follow_one_over_n_and_order_as_they_should():
    features, labels = gaussian_reference()
    out = fid_floor.floors(features, labels, samples=[400, 2000], halves=[100, 200, 400, 800], repeats=8)
    halves = out["split_halves"]
    means = [halves[str(n)]["mean"] for n in (100, 200, 400, 800)]
    assert means == sorted(means, reverse=True) and means[-1] > 0  # fewer samples, higher FID
    cs = [halves[str(n)]["c"] for n in (100, 200, 400, 800)]
    assert max(cs) / min(cs) < 1.6, cs  # the 1/n law: c about constant over an 8x range of n
    # for a d-dimensional Gaussian, E[FID] of two independent n-sample fits is about (2 / n)(d + d (d + 1) / 4): the
    # means' term 2d / n and the covariances' (measured: c = 9, 25, 86 for d = 4, 8, 16); d = 8 gives c ~ 26, and
    # this mixture of 4 shifted classes a little more
    assert 20 < out["c"] < 40, out["c"]
    n_ref = out["reference_images"]
    assert n_ref == 1600
    assert out["independent"]["400"] == pytest.approx(out["c"] * (1 / 400 + 1 / n_ref))
    assert out["independent"]["2000"] < out["independent"]["400"]
    # drawing the reference's own images sits far below an independent draw of the same size
    assert out["memorizer"]["400"]["mean"] < out["bootstrap"]["400"]["mean"] < out["independent"]["400"]
    assert "2000" not in out["memorizer"]  # 500 per class: more than the reference holds without replacement


def test_class_ids_need_not_start_at_zero():
    features, labels = gaussian_reference()
    out = fid_floor.floors(features, labels + 5, samples=[400], halves=[100], repeats=2)  # transfer's digits 5-9
    assert set(out["memorizer"]) == {"400"}  # 100 per class of the 400 each class holds


def test_halves_larger_than_the_reference_are_refused():
    features, labels = gaussian_reference(n_per_class=50)
    with pytest.raises(ValueError, match="--halves: 150 per half needs 300 reference images, it has 200"):
        fid_floor.floors(features, labels, samples=[100], halves=[150], repeats=2)


def test_a_small_training_set_sits_above_the_references_own_draws_and_below_another_distribution():
    features, labels = gaussian_reference()
    out = fid_floor.floors(features, labels, samples=[400], halves=[100], repeats=4)
    few = np.concatenate([np.flatnonzero(labels == c)[:10] for c in range(4)])  # 10 images per class
    train = fid_floor.training_set_floor(features[few], labels[few], features, samples=[400], repeats=4)
    assert train["images"] == 40
    # reproducing 40 of the reference's images covers less of it than drawing from all 1,600 of them
    assert out["bootstrap"]["400"]["mean"] < train["draws"]["400"]["mean"]
    shifted = fid_floor.training_set_floor(features[few] + 1.0, labels[few], features, samples=[400], repeats=4)
    # a mean shift of 1 in 8 dims adds about 8
    assert shifted["draws"]["400"]["mean"] > train["draws"]["400"]["mean"] + 1.0


def test_a_training_set_floor_needs_the_digits_feature_space():
    with pytest.raises(SystemExit, match="--training_set: the reference's features are not the digits classifier's"):
        fid_floor.dataset_features("unused", "features=InceptionV3; reference=x; resolution=299; max_images=None")
