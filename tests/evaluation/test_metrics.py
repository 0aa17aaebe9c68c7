"""Metrics against closed forms and exact small cases; the reference-statistics cache."""

import numpy as np
import pytest

from sadm_finetune.evaluation.metrics import (
    feature_statistics,
    fid,
    frechet_distance,
    kid,
    load_reference_stats,
    mmd2_unbiased,
    precision_recall,
    save_reference_stats,
)


def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 16))
    assert abs(fid(feats, feats)) < 1e-6


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.5, 2.0, size=8), rng.uniform(0.5, 2.0, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_fid_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=(20000, 4))
    b = rng.normal(1.0, 2.0, size=(20000, 4))
    expected = 4 * 1.0**2 + 4 * (1 + 4 - 2 * 2)  # ||mu1 - mu2||² + tr(s1 + s2 - 2 sqrt(s1 s2)) = 8
    assert fid(a, b) == pytest.approx(expected, rel=0.05)


def test_fid_stays_finite_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(0)
    value = fid(np.maximum(rng.normal(size=(20, 64)), 0), np.maximum(rng.normal(size=(20, 64)) + 0.1, 0))
    assert np.isfinite(value) and value > 0


def test_feature_statistics_need_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_statistics(np.zeros((1, 4)))


def _mmd2_by_definition(x, y):
    """Unbiased MMD² written out pair by pair, for comparison."""
    k = lambda a, b: (a @ b / len(a) + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_mmd2_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(7, 3))
    assert mmd2_unbiased(x, y) == pytest.approx(_mmd2_by_definition(x, y), rel=1e-10)


def test_kid_with_one_full_subset_equals_the_exact_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(1.0, 1.0, size=(12, 5))
    mean, std = kid(x, y, num_subsets=3, subset_size=100)  # clipped to 12: every subset is the full set
    assert mean == pytest.approx(_mmd2_by_definition(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_unbiased_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    mean, std = kid(a, b, num_subsets=20, subset_size=200)
    assert abs(mean) < 3 * std / np.sqrt(20) + 1e-3  # zero within the estimate's spread
    far_mean, far_std = kid(a, rng.normal(0.5, 1.0, size=(2000, 16)), num_subsets=20, subset_size=200)
    assert far_mean > 10 * far_std / np.sqrt(20) and far_mean > 0.05


def test_kid_is_reproducible_with_a_seed():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    assert kid(a, b, num_subsets=5, subset_size=50, seed=3) == kid(a, b, num_subsets=5, subset_size=50, seed=3)


def test_precision_recall_of_identical_sets_is_one():
    feats = np.random.default_rng(0).normal(size=(300, 8))
    assert precision_recall(feats, feats.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(0)
    assert precision_recall(rng.normal(size=(200, 8)), rng.normal(100.0, 1.0, size=(200, 8))) == (0.0, 0.0)


def test_precision_recall_see_mode_collapse_as_low_recall():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(500, 2))
    collapsed = rng.normal(size=(500, 2)) * 0.1  # all fakes near the mode: precise, not diverse
    precision, recall = precision_recall(real, collapsed, k=3, chunk_size=128)  # several chunks
    assert precision > 0.95 and recall < 0.3


def test_precision_recall_needs_more_samples_than_k():
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


def test_reference_stats_round_trip(tmp_path):
    feats = np.random.default_rng(0).normal(size=(50, 6))
    labels = np.arange(50) % 5
    path = tmp_path / "stats" / "ref.npz"
    save_reference_stats(path, feats, key="digits-classifier|builtin:digits", labels=labels)
    stats = load_reference_stats(path, expected_key="digits-classifier|builtin:digits")
    mu, sigma = feature_statistics(feats)
    np.testing.assert_allclose(stats.mu, mu)
    np.testing.assert_allclose(stats.sigma, sigma)
    np.testing.assert_array_equal(stats.features, feats)
    np.testing.assert_array_equal(stats.labels, labels)
    assert stats.key == "digits-classifier|builtin:digits"


def test_reference_stats_with_another_key_are_refused(tmp_path):
    path = tmp_path / "ref.npz"
    save_reference_stats(path, np.random.default_rng(0).normal(size=(10, 3)), key="inception|dir:/a")
    with pytest.raises(ValueError, match=r"made for \[inception\|dir:/a\], not \[digits\|dir:/a\]; delete it"):
        load_reference_stats(path, expected_key="digits|dir:/a")


def test_missing_reference_stats_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference_stats(tmp_path / "nope.npz")


def test_structure_gap_is_zero_for_the_same_set_and_grows_when_samples_collapse():
    from sadm_finetune.evaluation.metrics import structure_gap

    rng = np.random.default_rng(0)
    real = rng.normal(size=(500, 16))
    assert structure_gap(real, real) == pytest.approx(0.0, abs=1e-12)
    assert structure_gap(real, rng.normal(size=(500, 16))) < 0.02  # same distribution: small
    # collapsed samples (all near one direction) relate to each other unlike real images
    collapsed = rng.normal(size=(1, 16)) + 0.1 * rng.normal(size=(500, 16))
    assert structure_gap(real, collapsed) > 0.5
    assert structure_gap(real, collapsed) == structure_gap(real, collapsed)  # seeded: deterministic
