"""VAE encode/decode with the component's own scaling (`scaling_factor`, and `shift_factor` if any); sampling
from cached posteriors (`latent_cache.py`)."""

from __future__ import annotations

import torch
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


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode`: scaled latents -> (B, 3, H, W) pixels in [-1, 1]."""
    latents = latents / vae.config.scaling_factor + _shift(vae)
    return vae.decode(latents.to(device=vae.device, dtype=vae.dtype)).sample.float()


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
