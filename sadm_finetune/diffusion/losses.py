"""The diffusion losses as small classes: hyper-parameters in, per-sample (or batch) tensors and detached logs out.
(The loss terms' own losses live with each term, e.g. SADM's relations in terms/sadm/relations.py.)

No backward, no optimizer and no logging in here; the training step reduces and backpropagates.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

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
