"""Sample-quality metrics on feature arrays ``(N, D)``: FID, KID, improved precision/recall.

Pure functions: no model, no images. The feature extractor (``features.py``) turns images into the
arrays these functions compare; ``evaluate.py`` wires both to a pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

# Bump when the cache layout changes, so an old file is rejected instead of misread.
_CACHE_FORMAT = 1


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` of features ``(N, D)``, in float64."""
    features = _as_features(features, "features")
    if len(features) < 2:
        raise ValueError(f"features: need at least 2 samples for a covariance, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as computed by pytorch-fid.

    d² = ||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))  (Heusel et al. 2017, eq. 6)
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"frechet_distance: shapes differ (mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
            f"{sigma2.shape}); compare features from the same extractor"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # The product is (near) singular, e.g. fewer samples than feature dimensions.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off can leave a tiny imaginary part; a large one means the inputs are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: sqrt(sigma1 sigma2) has an imaginary part of "
                f"{np.max(np.abs(covmean.imag)):.3g}; check the features for NaNs or use more samples"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet Inception Distance between two feature sets (in whatever feature space they come from)."""
    return frechet_distance(*feature_statistics(feats_a), *feature_statistics(feats_b))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # k(x, y) = (x.y / d + 1)^3, the KID kernel of Binkowski et al. 2018.
    base = x @ y.T / x.shape[1] + 1.0
    return base * base * base  # much faster than ** 3 on large arrays


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between equal-size samples ``x`` and ``y`` with the cubic polynomial kernel."""
    m = len(x)
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    # Within-set sums leave out the diagonal (k(x_i, x_i)), which is what makes the estimate unbiased.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of unbiased MMD² over random subsets (as torch-fidelity).

    ``subset_size`` is clipped to the smaller set; subsets are drawn without replacement.
    """
    feats_a = _as_features(feats_a, "feats_a")
    feats_b = _as_features(feats_b, "feats_b")
    subset_size = min(subset_size, len(feats_a), len(feats_b))
    if subset_size < 2:
        raise ValueError(f"kid: need at least 2 samples in each set, got {len(feats_a)} and {len(feats_b)}")
    if num_subsets < 1:
        raise ValueError(f"kid: num_subsets must be >= 1, got {num_subsets}")
    rng = np.random.RandomState(seed)
    scores = np.array(
        [
            mmd2_unbiased(
                feats_a[rng.choice(len(feats_a), subset_size, replace=False)],
                feats_b[rng.choice(len(feats_b), subset_size, replace=False)],
            )
            for _ in range(num_subsets)
        ]
    )
    return float(scores.mean()), float(scores.std())


def _kth_neighbour_radii(features: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """Distance from each sample to its k-th nearest other sample, ``(N,)``."""
    radii = []
    for chunk in features.split(chunk_size):
        distances = torch.cdist(chunk, features)  # (chunk, N); includes the sample itself at 0
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk_size: int) -> float:
    """Fraction of ``queries`` that fall inside at least one support sample's k-NN ball."""
    inside = 0
    for chunk in queries.split(chunk_size):
        inside += int((torch.cdist(chunk, support) <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, chunk_size: int = 1024, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), with k-NN-ball manifolds.

    Precision: share of ``fake`` inside the real manifold; recall: share of ``real`` inside the fake
    one. Distances are computed ``chunk_size`` rows at a time (on ``device``, in float64), so 10k x 10k
    sets fit in memory.
    """
    real_t = torch.from_numpy(_as_features(real, "real")).to(device)
    fake_t = torch.from_numpy(_as_features(fake, "fake")).to(device)
    if min(len(real_t), len(fake_t)) <= k:
        raise ValueError(
            f"precision_recall: k={k} needs more than {k} samples per set, got {len(real_t)} real and "
            f"{len(fake_t)} fake; lower k or use more samples"
        )
    real_radii = _kth_neighbour_radii(real_t, k, chunk_size)
    fake_radii = _kth_neighbour_radii(fake_t, k, chunk_size)
    precision = _fraction_inside(fake_t, real_t, real_radii, chunk_size)
    recall = _fraction_inside(real_t, fake_t, fake_radii, chunk_size)
    return precision, recall


@dataclass
class ReferenceStats:
    """Cached reference-set statistics: FID's Gaussian plus the raw features KID and PR need."""

    key: str
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    features: np.ndarray  # (N, D)
    labels: np.ndarray | None = None  # (N,) class ids, when the reference has them


def save_reference_stats(
    path: str | Path, features: np.ndarray, key: str, labels: np.ndarray | None = None
) -> ReferenceStats:
    """Compute and save reference statistics to an ``.npz`` file tagged with ``key``.

    ``key`` names what the features came from (extractor name + reference description), so that
    ``load_reference_stats`` can refuse a cache made from something else.
    """
    features = _as_features(features, "features")
    mu, sigma = feature_statistics(features)
    stats = ReferenceStats(key=key, mu=mu, sigma=sigma, features=features, labels=labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": mu, "sigma": sigma, "features": features}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    with path.open("wb") as f:  # a file object keeps numpy from appending ".npz" to the name
        np.savez(f, key=np.array(key), format=np.array(_CACHE_FORMAT), **arrays)
    return stats


def load_reference_stats(path: str | Path, expected_key: str | None = None) -> ReferenceStats:
    """Load statistics saved by ``save_reference_stats``; raise if ``expected_key`` does not match."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference stats cache {path} does not exist; run once without it to create it")
    with np.load(path, allow_pickle=False) as data:
        if "key" not in data or int(data.get("format", -1)) != _CACHE_FORMAT:
            raise ValueError(f"reference stats cache {path} is not in this version's format; delete it to rebuild")
        key = str(data["key"])
        if expected_key is not None and key != expected_key:
            raise ValueError(
                f"reference stats cache {path} was made for [{key}], not [{expected_key}]; "
                "delete it or point to another cache file"
            )
        labels = data["labels"] if "labels" in data else None
        return ReferenceStats(key=key, mu=data["mu"], sigma=data["sigma"], features=data["features"], labels=labels)


def _as_features(features: np.ndarray, name: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name}: expected a (N, D) array, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{name}: contains NaN or inf; check the images and the feature extractor")
    return features


def structure_gap(reference_features: np.ndarray, features: np.ndarray, num_pairs: int = 20000, seed: int = 0) -> float:
    """How far the batch structure of the samples is from the reference's, in a fixed feature space.

    The 1-Wasserstein distance between the distributions of pairwise cosine similarities (random pairs
    i != j) among reference features and among generated features: 0 when pairs of samples relate to
    each other as pairs of real images do. Independent of any discriminator, so a run without SADM is
    measured the same way."""
    def pair_cosines(x: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(seed)  # the same pairs of indices for both sets
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        i = rng.integers(0, len(x), num_pairs)
        j = (i + rng.integers(1, len(x), num_pairs)) % len(x)  # j != i
        return np.sort(np.einsum("nd,nd->n", x[i], x[j]))

    real = pair_cosines(_as_features(reference_features, "reference_features").astype(np.float64))
    fake = pair_cosines(_as_features(features, "features").astype(np.float64))
    return float(np.abs(real - fake).mean())
