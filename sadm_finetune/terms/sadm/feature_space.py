"""SADM's semantic space (--disc_space features): D reads a frozen vision encoder's patch features of the
VAE-decoded latents instead of the latents themselves.

The relations of 8x8 (or 128x128) VAE latents mix semantics with the latent code's local statistics; a frozen
encoder's features (DINOv2 as REPA uses it) put the batch's pairwise structure where the paper's "structure" is
meant: in what the images show. The generator side stays differentiable: x0_hat -> VAE decoder -> encoder ->
D, so L_S reaches the denoiser through both frozen networks (their weights never train)."""

from __future__ import annotations

import torch

from ...diffusion.latents import decode_differentiable
from ..repa.term import VisionEncoder, load_encoder_config


class FeatureSpace:
    """Scaled latents (B, C, h, w) -> the frozen encoder's patch features (B, E, gh, gw), fp32."""

    def __init__(self, vae, encoder: VisionEncoder) -> None:
        self.vae = vae.requires_grad_(False)  # the run's VAE never trains; gradients pass through it only
        self.encoder = encoder

    @classmethod
    def from_pretrained(cls, vae, name: str, resolution: int) -> "FeatureSpace":
        # The encoder sits beside the VAE (the frozen modules' device and dtype).
        return cls(vae, VisionEncoder.from_pretrained(name, resolution, vae.device, vae.dtype))

    @staticmethod
    def channels(name: str) -> int:
        """D's input channels: the encoder's width, read from its config (no weights loaded)."""
        return load_encoder_config(name).hidden_size

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and latents.requires_grad):
            pixels = decode_differentiable(self.vae, latents)  # (B, 3, H, W) in about [-1, 1]
            return self.encoder.features(pixels.clamp(-1, 1)).float()
