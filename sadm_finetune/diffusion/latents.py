"""VAE encode/decode with the component's own scaling (`scaling_factor`, and `shift_factor` if any); sampling
from cached posteriors (`latent_cache.py`); a batch's loss masks on the latent grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.utils.torch_utils import randn_tensor


def _shift(vae: AutoencoderKL) -> float:
    return getattr(vae.config, "shift_factor", None) or 0.0


@torch.no_grad()
def encode(vae: AutoencoderKL, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, C, h, w) fp32 latents, scaled as the pipeline expects."""
    posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    latents = posterior.sample(generator=generator)
    return ((latents - _shift(vae)) * vae.config.scaling_factor).float()


def decode_differentiable(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> (B, 3, H, W) fp32 pixels in about [-1, 1], differentiable in the latents (SADM's feature
    space backpropagates through the frozen decoder)."""
    latents = latents / vae.config.scaling_factor + _shift(vae)
    return vae.decode(latents.to(device=vae.device, dtype=vae.dtype)).sample.float()


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode`: scaled latents -> (B, 3, H, W) pixels in [-1, 1]."""
    return decode_differentiable(vae, latents)


def sample_latents(vae: AutoencoderKL, mean: torch.Tensor, std: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw from a cached posterior (unscaled mean, std) exactly as `encode` draws from the VAE's
    `latent_dist`, then scale: (B, C, h, w) fp32 latents."""
    mean = mean.to(device=vae.device, dtype=vae.dtype)
    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    latents = mean + std.to(mean) * noise
    return ((latents - _shift(vae)) * vae.config.scaling_factor).float()


def clean_latents(vae: AutoencoderKL, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """z0 for a training batch: a draw from the cached posterior (latent_cache.py) when the batch carries
    one, else from the VAE encoder; the same draw either way for the same generator."""
    if "latent_mean" in batch:
        return sample_latents(vae, batch["latent_mean"], batch["latent_std"], generator=generator)
    return encode(vae, batch["pixel_values"], generator=generator)


def latent_mask(pixel_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) pixel masks -> (B, 1, h, w) on the latent grid: each latent position gets the mean of the pixels
    it covers (area interpolation, kohya's apply_masked_loss), so it is 0 exactly where all of them are masked out."""
    return F.interpolate(pixel_masks.float(), size=tuple(size), mode="area")


def latent_loss_mask(batch: dict, latents: torch.Tensor) -> torch.Tensor | None:
    """The batch's loss mask on the grid of `latents`, (B, 1, h, w) fp32 on their device: cached latent masks
    (`latent_masks`), else the pixel masks (`masks`) downsampled; None when the batch has no masks."""
    if "latent_masks" in batch:
        mask = batch["latent_masks"].float()
    elif "masks" in batch:
        mask = latent_mask(batch["masks"].to(latents.device), latents.shape[-2:])
    else:
        return None
    return mask.to(device=latents.device, dtype=torch.float32)
