"""Losses as small classes: hyper-parameters in, per-sample (or batch) tensors and detached logs out.

No backward, no optimizer and no logging in here; the training step reduces and backpropagates.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F

PredictionType = Literal["epsilon", "v_prediction", "sample"]


def _per_t(values: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    """Index a (T,) schedule tensor with (B,) timesteps and broadcast to `ndim` dims."""
    out = values.to(timesteps.device)[timesteps].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


def diffusion_target(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """What the model is trained to output, for the scheduler's prediction type."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return latents
    if prediction_type == "v_prediction":
        ab = _per_t(alphas_cumprod, timesteps, latents.ndim)
        return ab.sqrt() * noise - (1 - ab).sqrt() * latents
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def predicted_original_sample(
    model_pred: torch.Tensor, noisy_latents: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """x0_hat from the model output (docs/design.md §1 step 4); differentiable in `model_pred`."""
    if prediction_type == "sample":
        return model_pred
    ab = _per_t(alphas_cumprod, timesteps, noisy_latents.ndim)
    if prediction_type == "epsilon":
        return (noisy_latents - (1 - ab).sqrt() * model_pred) / ab.sqrt()
    if prediction_type == "v_prediction":
        return ab.sqrt() * noisy_latents - (1 - ab).sqrt() * model_pred
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    ab = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ab / (1 - ab)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean over every dimension but the batch's, (B,). `mask` (B, 1, h, w) in [0, 1] weighs each element
    by the mask at its position and the sum is still divided by the element count, not by the mask's area (kohya's
    apply_masked_loss and SimpleTuner: a sample masked to a quarter of the image adds about a quarter of its loss)."""
    if mask is not None:
        values = values * mask.to(values.dtype)
    return values.mean(dim=tuple(range(1, values.ndim)))


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's loss from per-sample values (B,): their mean, each weighted by `weights` (B,) when a batch carries
    them (prior preservation, prior.py: instance mean + prior_loss_weight * class mean)."""
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample)).mean()


class DiffusionLoss:
    """The pretrained model's own objective: MSE to its target, optionally min-SNR-gamma weighted
    (Hang et al. 2023, eq. 7-9, in the form diffusers' examples use)."""

    def __init__(self, prediction_type: PredictionType, snr_gamma: float | None = None) -> None:
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma

    def __call__(self, model_pred: torch.Tensor, target: torch.Tensor, sample_snr: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss, (B,). `sample_snr`: the noise process's SNR of each sample's timestep; `mask`: the latent
        loss mask (B, 1, h, w), see `masked_mean`."""
        per_sample = masked_mean((model_pred.float() - target.float()).pow(2), mask)  # (B,)
        if self.snr_gamma is None:
            return per_sample
        s = sample_snr.float()
        clipped = torch.clamp(s, max=self.snr_gamma)
        if self.prediction_type == "epsilon":
            weight = clipped / s
        elif self.prediction_type == "v_prediction":
            weight = clipped / (s + 1)
        else:
            weight = clipped
        return per_sample * weight


def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


class LearnedSigmaVLB:
    """DiT's variational-bound term for the learned-variance channels (Nichol & Dhariwal 2021, eq. 15-16;
    DiT's `gaussian_diffusion.training_losses`). The mean is frozen: only the variance learns from it."""

    def __init__(self, betas: torch.Tensor, device: torch.device | str | None = None) -> None:
        betas = betas.double().cpu()  # schedule maths in float64 once, then float32 on the training device
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        self.alphas_cumprod = alphas_cumprod.float()
        self.log_betas = torch.log(betas).float()
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        ).float()
        self.posterior_mean_coef1 = (betas * prev.sqrt() / (1.0 - alphas_cumprod)).float()
        self.posterior_mean_coef2 = ((1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)).float()
        for name in ("alphas_cumprod", "log_betas", "posterior_log_variance_clipped", "posterior_mean_coef1",
                     "posterior_mean_coef2"):
            setattr(self, name, getattr(self, name).to(device))

    def __call__(
        self, eps_pred: torch.Tensor, var_pred: torch.Tensor, latents: torch.Tensor, noisy_latents: torch.Tensor,
        timesteps: torch.Tensor, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample bound in bits per dimension, (B,), each latent position weighted by `mask` (B, 1, h, w) if
        given (`masked_mean`). `eps_pred` is detached here (frozen mean)."""
        nd = latents.ndim
        x_t, x_0 = noisy_latents.float(), latents.float()
        ab = _per_t(self.alphas_cumprod, timesteps, nd)
        c1 = _per_t(self.posterior_mean_coef1, timesteps, nd)
        c2 = _per_t(self.posterior_mean_coef2, timesteps, nd)
        min_log = _per_t(self.posterior_log_variance_clipped, timesteps, nd)
        max_log = _per_t(self.log_betas, timesteps, nd)

        pred_x0 = (x_t - (1 - ab).sqrt() * eps_pred.detach().float()) / ab.sqrt()
        frac = (var_pred.float() + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        model_mean = c1 * pred_x0 + c2 * x_t
        true_mean = c1 * x_0 + c2 * x_t

        kl = masked_mean(_normal_kl(true_mean, min_log, model_mean, model_log_variance), mask) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x_0, model_mean, 0.5 * model_log_variance)
        nll = masked_mean(nll, mask) / math.log(2.0)
        return torch.where(timesteps == 0, nll, kl)


# ---------------------------------------------------------------------------------------------
# SADM structure loss (docs/design.md §1 steps 6-8)


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
    weights it is sqrt(SNR_i) / gamma: it vanishes at high noise (tests/test_losses.py measures both)."""

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
