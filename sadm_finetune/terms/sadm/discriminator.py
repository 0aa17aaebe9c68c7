"""The SADM structure discriminator: a small timestep-conditioned conv encoder on VAE latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def _maybe_sn(module: nn.Module, enabled: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(module) if enabled else module


class _Block(nn.Module):
    """Stride-2 conv, plus a per-channel shift from the timestep embedding, then SiLU."""

    def __init__(self, in_channels: int, out_channels: int, temb_dim: int, spectral_norm: bool) -> None:
        super().__init__()
        self.conv = _maybe_sn(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), spectral_norm)
        self.temb = _maybe_sn(nn.Linear(temb_dim, out_channels), spectral_norm)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return F.silu(self.conv(x) + self.temb(temb)[:, :, None, None])


class StructureDiscriminator(ModelMixin, ConfigMixin):
    """D_phi(z, t[, class]) -> unit-norm embedding (B, embed_dim).

    The output is L2-normalised so that the discriminator cannot grow the structure distance by
    scaling; spectral normalisation bounds its Lipschitz constant. `score_head` adds a per-sample real/fake
    logit (the per-sample adversarial control, `forward(..., return_score=True)`), built after every other
    layer so the default D initialises exactly as without it.

    The forward always runs in fp32 (autocast disabled inside it, which also overrides the autocast that
    accelerate wraps a prepared model's forward in): relations of unit embeddings of a nearly perfect
    x0_hat differ from the real ones by less than bf16 resolves (tests/terms/sadm/test_discriminator.py bounds the
    structure gradient's error under bf16 autocast).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        base_channels: int = 32,
        num_blocks: int = 3,
        embed_dim: int = 128,
        num_classes: int = 0,
        spectral_norm: bool = True,
        score_head: bool = False,
    ) -> None:
        super().__init__()
        temb_dim = base_channels * 4
        self.time_proj = Timesteps(base_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = nn.Sequential(
            _maybe_sn(nn.Linear(base_channels, temb_dim), spectral_norm),
            nn.SiLU(),
            _maybe_sn(nn.Linear(temb_dim, temb_dim), spectral_norm),
        )
        # One extra row: the null class, for unconditional samples.
        self.class_embed = nn.Embedding(num_classes + 1, temb_dim) if num_classes > 0 else None
        self.stem = _maybe_sn(nn.Conv2d(in_channels, base_channels, 3, padding=1), spectral_norm)
        channels = [base_channels * 2**i for i in range(num_blocks + 1)]
        self.blocks = nn.ModuleList(
            _Block(channels[i], channels[i + 1], temb_dim, spectral_norm) for i in range(num_blocks)
        )
        self.head = _maybe_sn(nn.Linear(channels[-1], embed_dim), spectral_norm)
        self.score = _maybe_sn(nn.Linear(channels[-1], 1), spectral_norm) if score_head else None

    def forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None,
        return_score: bool = False,
    ) -> torch.Tensor:
        # latents: (B, C, H, W); timesteps: (B,) -> (B, embed_dim), unit norm, fp32; or (B,) logits
        with torch.autocast(latents.device.type, enabled=False):
            return self._forward(latents, timesteps, class_labels, return_score)

    def _forward(self, latents, timesteps, class_labels, return_score: bool) -> torch.Tensor:
        dtype = self.dtype
        temb = self.time_embed(self.time_proj(timesteps).to(dtype))
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full_like(timesteps, self.config.num_classes, dtype=torch.long)
            labels = class_labels.clamp(max=self.config.num_classes)  # ids past the table: the null row
            temb = temb + self.class_embed(labels)
        temb = F.silu(temb)
        h = F.silu(self.stem(latents.to(dtype)))
        for block in self.blocks:
            h = block(h, temb)
        pooled = h.mean(dim=(2, 3))
        if return_score:
            if self.score is None:
                raise ValueError("this discriminator has no score head (build it with score_head=True)")
            return self.score(pooled).float().squeeze(-1)
        embedding = self.head(pooled)
        return F.normalize(embedding.float(), dim=-1)
