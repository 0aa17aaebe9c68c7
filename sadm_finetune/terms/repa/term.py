"""REPA as a loss term (Yu et al. 2024, "Representation Alignment for Generation").

A small MLP projector maps the denoiser's hidden states after block `repa_depth` to the patch features
of a frozen vision encoder (DINOv2 by default) on the clean image; the loss is minus the mean patch-wise
cosine similarity (the paper's Eq. 8, `L_REPA = -E[1/N sum_n sim(y*_n, h_phi(h_t^n))]`). Where the two
token grids differ, the encoder's grid is interpolated (2-D bilinear) to the denoiser's.

With --cache_latents the batch has no pixels; the encoder features come from the feature cache beside
the latents (terms/repa_cache.py) and the encoder is never loaded for training.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ...utils.errors import ConfigError, InputError, first_line
from ..base import StepContext, Term

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURES_KEY = "repa_features"  # a batch's cached encoder features, (B, E, gh, gw)


def build_projector(hidden_size: int, projector_dim: int, encoder_dim: int) -> nn.Sequential:
    """REPA's projector h_phi: a 3-layer MLP with SiLU, applied to each token."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, encoder_dim),
    )


# -- the frozen vision encoder -----------------------------------------------------------------------------
def _encoder_error(name: str, error: BaseException) -> InputError:
    from huggingface_hub import constants

    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not path.exists():
        return InputError(f"repa_encoder: folder {name} not found; pass an existing model folder or a Hub id like "
                          "facebook/dinov2-base")
    if constants.is_offline_mode() and not path.exists():
        return InputError(f"repa_encoder: {name} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                          f"and offline mode is on (HF_HUB_OFFLINE=1); fetch it with `hf download {name}` on a "
                          "connected machine and copy the cache here, or unset HF_HUB_OFFLINE")
    return InputError(f"repa_encoder: cannot load {name} ({first_line(error)}); check the id or folder and your "
                      "network")


def load_encoder_config(name: str):
    """The encoder's transformers config (config.json only, no weights); one-line errors; vision models only."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise _encoder_error(name, e) from None
    if not all(isinstance(getattr(config, key, None), int) for key in ("patch_size", "num_channels", "hidden_size")):
        raise ConfigError("repa_encoder", f"{name} is a {config.model_type} model, not a vision transformer with "
                          "patch tokens", "pass a vision backbone such as facebook/dinov2-base")
    return config


def encoder_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the encoder's image-processor config if it has one, else ImageNet's."""
    from transformers.utils import cached_file

    try:
        path = cached_file(name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        path = None
    if path is None:
        return IMAGENET_MEAN, IMAGENET_STD
    processor = json.loads(Path(path).read_text())
    return tuple(processor.get("image_mean", IMAGENET_MEAN)), tuple(processor.get("image_std", IMAGENET_STD))


class VisionEncoder:
    """A frozen vision encoder and its preprocessing: pixels in [-1, 1] -> patch features on its grid."""

    def __init__(self, model: nn.Module, resolution: int, mean, std) -> None:
        self.model = model.eval().requires_grad_(False)
        self.resolution = resolution
        self.patch_size = model.config.patch_size
        self.dim = model.config.hidden_size
        param = next(model.parameters())
        self.mean = torch.tensor(mean, device=param.device, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=param.device, dtype=torch.float32).view(1, -1, 1, 1)
        # ViT-style models interpolate their positional embedding only when asked; DINOv2 always does.
        self._kwargs = ({"interpolate_pos_encoding": True}
                        if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters else {})

    @classmethod
    def from_pretrained(cls, name: str, resolution: int, device: torch.device, dtype: torch.dtype) -> "VisionEncoder":
        from transformers import AutoModel

        load_encoder_config(name)
        try:
            model = AutoModel.from_pretrained(name, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise _encoder_error(name, e) from None
        mean, std = encoder_normalisation(name)
        return cls(model.to(device=device, dtype=dtype), resolution, mean, std)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The encoder's input size for an image of (height, width): resolution^2 pixels at the same aspect."""
        scale = self.resolution / math.sqrt(height * width)
        return max(self.patch_size, round(height * scale)), max(self.patch_size, round(width * scale))

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> (B, E, gh, gw) patch features (CLS and register tokens dropped)."""
        return self.features(pixel_values)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`__call__` differentiable in the pixels (the encoder's own weights stay frozen): SADM's feature
        space (--disc_space features) backpropagates through it into x0_hat."""
        size = self.input_size(*pixel_values.shape[-2:])
        x = pixel_values.to(device=self.device, dtype=torch.float32)
        # REPA resizes bicubically (no antialias); resize and the per-channel affine normalisation commute.
        x = F.interpolate((x + 1) / 2, size=size, mode="bicubic", align_corners=False)
        x = ((x - self.mean) / self.std).to(self.dtype)
        tokens = self.model(pixel_values=x, **self._kwargs).last_hidden_state  # (B, prefix + gh * gw, E)
        gh, gw = size[0] // self.patch_size, size[1] // self.patch_size
        patches = tokens[:, tokens.shape[1] - gh * gw:]  # DINOv2: [:, 1 + num_register_tokens:]
        return patches.transpose(1, 2).reshape(len(x), -1, gh, gw)


# -- the loss ------------------------------------------------------------------------------------------
def denoiser_tokens(hidden: torch.Tensor, latent_size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """A block's output as (B, N, D) tokens and their (gh, gw) grid: a transformer's (B, N, D) tokens cover
    the latent grid row-major (patches of p x p latents); a UNet's (B, C, h, w) map is flattened."""
    if hidden.dim() == 4:
        return hidden.flatten(2).transpose(1, 2), (hidden.shape[2], hidden.shape[3])
    h, w = latent_size
    patch = math.isqrt(h * w // hidden.shape[1])
    if patch < 1 or (h // patch) * (w // patch) != hidden.shape[1]:
        raise ValueError(f"{hidden.shape[1]} tokens do not tile a {h}x{w} latent grid")
    return hidden, (h // patch, w // patch)


def match_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, E, eh, ew) encoder features -> (B, gh * gw, E) fp32 on the denoiser's grid (2-D bilinear)."""
    features = features.float()
    if tuple(features.shape[-2:]) != tuple(grid):
        features = F.interpolate(features, size=grid, mode="bilinear", align_corners=False)
    return features.flatten(2).transpose(1, 2)


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8: minus the mean patch-wise cosine similarity, per sample. (B, N, E) each -> loss (B,), cosine (B,)."""
    cosine = F.cosine_similarity(projected.float(), target.float(), dim=-1).mean(dim=1)
    return -cosine, cosine


def feature_width(denoiser: nn.Module, index: int) -> int:
    """The channel width of the output of feature block `index` (models.family `feature_blocks` order)."""
    config = denoiser.config
    if "block_out_channels" in config:  # a UNet: down stages, the mid block, up stages
        channels = list(config.block_out_channels)
        return (channels + channels[-1:] + channels[::-1])[index]
    return config.num_attention_heads * config.attention_head_dim


class RepaTerm(Term):
    """lambda * L_REPA for the denoiser and its projector (a joint module, trained by the denoiser's optimizer)."""

    name = "repa"
    weight_key = None  # a constant lambda: in the run's config, not the logs

    def __init__(self, config, adapter, autocast) -> None:
        r = self.config = config.repa
        self.autocast = autocast
        self.feature_blocks = (r.repa_depth - 1,)
        denoiser = adapter.denoiser
        encoder_dim = load_encoder_config(r.repa_encoder).hidden_size
        self.projector = build_projector(feature_width(denoiser, r.repa_depth - 1), r.repa_projector_dim, encoder_dim)
        # With cached latents the features come from the feature cache: the encoder is not needed here.
        vae = adapter.vae  # frozen modules sit on the device in the weight dtype
        self.encoder = None if config.data.cache_latents else VisionEncoder.from_pretrained(
            r.repa_encoder, r.repa_encoder_resolution, vae.device, vae.dtype)

    @staticmethod
    def check(config, adapter, accelerator) -> None:
        """Before any heavy work: the depth within the denoiser, a vision encoder, no FSDP."""
        r = config.repa
        blocks = len(adapter.feature_blocks(adapter.denoiser))
        if r.repa_depth > blocks:
            raise ConfigError("repa_depth", f"is {r.repa_depth}, but the denoiser has {blocks} feature blocks",
                              f"pass --repa_depth between 1 and {blocks}")
        from accelerate.utils import DistributedType

        if accelerator.distributed_type == DistributedType.FSDP:
            raise ConfigError("repa_weight", "REPA's projector trains with the denoiser's optimizer, which "
                              "accelerate's FSDP maps onto the sharded denoiser only",
                              "use DDP (accelerate launch --multi_gpu), or --repa_weight 0")
        load_encoder_config(r.repa_encoder)

    def joint_modules(self) -> dict[str, nn.Module]:
        return {"projector": self.projector}

    def bind(self, prepared, joint) -> None:
        self.projector = joint["projector"]

    @property
    def unwrapped_projector(self) -> nn.Module:
        return extract_model_from_parallel(self.projector)

    def weight(self, step: int) -> float:
        return self.config.repa_weight

    def summary_lines(self, denoiser) -> list[str]:
        r = self.config
        size = sum(p.numel() for p in self.unwrapped_projector.parameters())
        return [f"REPA: lambda {r.repa_weight}, block {r.repa_depth}, encoder {r.repa_encoder} at "
                f"{r.repa_encoder_resolution} px, projector {size / 1e6:.3f} M parameters"
                + (" (features cached)" if self.encoder is None else "")]

    def target_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, E, eh, ew) encoder features of the clean images: cached, or computed from the pixels."""
        if FEATURES_KEY in batch:
            return batch[FEATURES_KEY]
        if self.encoder is None or "pixel_values" not in batch:
            raise RuntimeError("REPA: the batch has neither cached encoder features nor pixels")
        return self.encoder(batch["pixel_values"])

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, grid = denoiser_tokens(ctx.hidden[self.feature_blocks[0]], tuple(ctx.latents.shape[-2:]))
        target = match_grid(self.target_features(ctx.batch).to(tokens.device), grid)  # (B, N, E) fp32
        with self.autocast():
            projected = self.projector(tokens)  # (B, N, E)
        loss, cosine = repa_loss(projected, target)
        return loss, {"repa_cosine": cosine.mean().detach()}
