"""SADM's structure loss (docs/design.md §1 steps 6-8): noise-level weights of the samples, pairwise relation
matrices of D's embeddings, their distance L_S, and the per-sample GAN control. Per-sample (or batch) tensors and
detached logs out; no backward here."""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

from ...diffusion.losses import snr


def structure_weights(
    sample_snr: Callable[[torch.Tensor], torch.Tensor], timesteps: torch.Tensor,
    mode: Literal["min_snr", "none", "cutoff"], gamma: float = 5.0, t_cutoff: int = 300,
) -> torch.Tensor:
    """w_i per sample, (B,), for any noise process (`sample_snr`: timesteps -> SNR). min_snr:
    min(SNR(t_i), gamma) / gamma, which tames d x0_hat / d eps_hat = -1/sqrt(SNR); cutoff: t_i < t_cutoff."""
    if mode == "none":
        return torch.ones(timesteps.shape, device=timesteps.device)
    if mode == "min_snr":
        return torch.clamp(sample_snr(timesteps), max=gamma) / gamma
    if mode == "cutoff":
        return (timesteps < t_cutoff).float()
    raise ValueError(f"unknown timestep weighting {mode!r}")


def structure_sample_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, mode: Literal["min_snr", "none", "cutoff"],
    gamma: float = 5.0, t_cutoff: int = 300,
) -> torch.Tensor:
    """`structure_weights` over a DDPM schedule."""
    return structure_weights(lambda t: snr(t, alphas_cumprod), timesteps, mode, gamma, t_cutoff)


def off_diagonal_mean(matrix: torch.Tensor) -> torch.Tensor:
    """Mean of the off-diagonal entries of a (B, B) matrix. A multiply-and-sum rather than boolean
    indexing: no data-dependent shape, so no host sync on GPU, and less memory at large B."""
    b = matrix.shape[0]
    off = 1.0 - torch.eye(b, dtype=matrix.dtype, device=matrix.device)
    return (matrix * off).sum() / (b * (b - 1))


def relation_matrix(embeddings: torch.Tensor, kind: Literal["cosine", "euclidean", "rbf"]) -> torch.Tensor:
    """(B, d) unit-norm embeddings -> (B, B) pairwise relations; only off-diagonal entries are used."""
    e = embeddings.float()
    cos = e @ e.T
    if kind == "cosine":
        return cos
    sq_dist = (2.0 - 2.0 * cos).clamp(min=1e-12)  # |a - b|^2 for unit vectors
    if kind == "euclidean":
        dist = sq_dist.sqrt()
        return dist / off_diagonal_mean(dist).clamp(min=1e-12)
    if kind == "rbf":
        bandwidth = off_diagonal_mean(sq_dist).clamp(min=1e-12)  # mean pairwise squared distance
        return torch.exp(-sq_dist / bandwidth)
    raise ValueError(f"unknown relation {kind!r}")


class StructureLoss:
    """L_S: distance between the real and fake relation matrices over off-diagonal pairs, each pair
    weighted by sqrt(w_i w_j) (`pair_weighting="geometric"`) or min(w_i, w_j) ("min"). The denoiser minimises
    it, the discriminator maximises it.

    With geometric weights a pair of a noisy sample i (w_i = SNR_i / gamma) and a clean one (w_j = 1) pushes
    x0_hat_i with weight sqrt(SNR_i / gamma); since d x0_hat / d eps_hat = -1 / sqrt(SNR) (epsilon models),
    the push on the noise prediction is the constant 1 / sqrt(gamma) however noisy the sample. With min
    weights it is sqrt(SNR_i) / gamma: it vanishes at high noise (tests/diffusion/test_losses.py measures both)."""

    def __init__(
        self, relation: Literal["cosine", "euclidean", "rbf"] = "cosine",
        distance: Literal["mse", "l1", "kl"] = "mse", kl_temperature: float = 0.1,
        pair_weighting: Literal["geometric", "min"] = "geometric",
    ) -> None:
        self.relation = relation
        self.distance = distance
        self.kl_temperature = kl_temperature
        self.pair_weighting = pair_weighting

    def __call__(
        self, real_embeddings: torch.Tensor, fake_embeddings: torch.Tensor, sample_weights: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, d), (B, d), (B,) -> scalar L_S and detached diagnostics."""
        b = real_embeddings.shape[0]
        if b < 2:
            raise ValueError("the structure loss needs a batch of at least 2 samples")
        r_real = relation_matrix(real_embeddings, self.relation)
        r_fake = relation_matrix(fake_embeddings, self.relation)
        off = ~torch.eye(b, dtype=torch.bool, device=r_real.device)
        w = sample_weights.float()
        if self.distance == "kl":
            # Row-wise KL(P_real,i || P_fake,i) of softmax rows over j != i, weighted by w_i.
            # A large finite fill, not -inf: -inf on the diagonal makes 0 * (-inf - -inf) = NaN gradients.
            logits_real = (r_real / self.kl_temperature).masked_fill(~off, -1e9)
            logits_fake = (r_fake / self.kl_temperature).masked_fill(~off, -1e9)
            log_p = F.log_softmax(logits_real, dim=1)
            log_q = F.log_softmax(logits_fake, dim=1)
            row_kl = (log_p.exp() * (log_p - log_q)).masked_fill(~off, 0.0).sum(dim=1)  # (B,)
            loss = (w * row_kl).mean()
        else:
            diff = r_real - r_fake
            per_pair = diff.pow(2) if self.distance == "mse" else diff.abs()
            if self.pair_weighting == "min":
                pair_w = torch.minimum(w[:, None], w[None, :])
            else:
                pair_w = torch.sqrt(w[:, None] * w[None, :])
            loss = off_diagonal_mean(pair_w * per_pair)
        logs = {
            "relation_real_mean": off_diagonal_mean(r_real).detach(),
            "relation_fake_mean": off_diagonal_mean(r_fake).detach(),
        }
        return loss, logs


class PerSampleAdversarialLoss:
    """The control without structure: a per-sample GAN loss on D's scores of z0 (real) and x0_hat (fake),
    each sample weighted by its noise-level weight w_i (the weights SADM's pairs are built from).

    ns (non-saturating): L_D = softplus(-s_real) + softplus(s_fake), L_G = softplus(-s_fake);
    hinge: L_D = relu(1 - s_real) + relu(1 + s_fake), L_G = -s_fake. Returned as the "structure" value the
    SADM objective maximises for D and minimises for the denoiser: `generator(...)` and `discriminator(...)`."""

    def __init__(self, kind: Literal["ns", "hinge"] = "ns") -> None:
        self.kind = kind

    def generator(self, score_fake: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
        per = F.softplus(-score_fake.float()) if self.kind == "ns" else -score_fake.float()
        return (sample_weights.float() * per).mean()

    def discriminator(self, score_real: torch.Tensor, score_fake: torch.Tensor, sample_weights: torch.Tensor
                      ) -> torch.Tensor:
        real, fake = score_real.float(), score_fake.float()
        if self.kind == "ns":
            per = F.softplus(-real) + F.softplus(fake)
        else:
            per = F.relu(1.0 - real) + F.relu(1.0 + fake)
        return (sample_weights.float() * per).mean()
