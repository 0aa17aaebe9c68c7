"""DiffFit (Xie et al. 2023, "DiffFit: Unlocking Transferability of Large Diffusion Models via Simple
Parameter-Efficient Fine-Tuning"): train only the biases, the normalisation layers, the class
embeddings and a learnable per-channel scale gamma (initialised to 1) on the output of every
attention and feed-forward branch of the transformer blocks.

gamma sits on a forward hook of each branch's output projection, y = gamma * (W x + b), so it folds
exactly into stock weights at export: W' = diag(gamma) W, b' = gamma * b. The exported pipeline
therefore has no extra modules and loads with stock diffusers.
"""

from __future__ import annotations

import copy

import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

SCALE_NAME = "difffit_scale"
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)


def _scaled_outputs(model: nn.Module) -> list[nn.Linear]:
    """The output projections whose outputs DiffFit scales: attention (self and cross) and feed-forward."""
    linears: list[nn.Linear] = []
    for block in model.modules():
        if not isinstance(block, BasicTransformerBlock):
            continue
        for attn in (block.attn1, getattr(block, "attn2", None)):
            if attn is not None:
                linears.append(attn.to_out[0])
        if getattr(block, "ff", None) is not None:
            linears.append(block.ff.net[-1])
    return linears


def _scale_hook(module: nn.Linear, inputs, output: torch.Tensor) -> torch.Tensor:
    return output * getattr(module, SCALE_NAME).to(output.dtype)


def attach_difffit(model: nn.Module) -> list[str]:
    """Freeze `model` except DiffFit's parameter set; add the scale factors. Returns the trainable names."""
    linears = _scaled_outputs(model)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no transformer blocks for DiffFit's scale factors")
    model.requires_grad_(False)
    for linear in linears:
        scale = nn.Parameter(torch.ones(linear.out_features, device=linear.weight.device, dtype=torch.float32))
        linear.register_parameter(SCALE_NAME, scale)
        linear.register_forward_hook(_scale_hook)
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES) or name.endswith("class_embedder") or isinstance(module, nn.Embedding):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    for name, p in model.named_parameters():
        if name.endswith(".bias") or name.endswith(SCALE_NAME):
            p.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def has_difffit(model: nn.Module) -> bool:
    return any(name.endswith(SCALE_NAME) for name, _ in model.named_parameters())


@torch.no_grad()
def folded_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every scale folded into its projection and the hooks removed: stock weights."""
    folded = copy.deepcopy(model)
    for module in folded.modules():
        if not isinstance(module, nn.Linear) or not hasattr(module, SCALE_NAME):
            continue
        scale = getattr(module, SCALE_NAME).detach()
        module.weight.mul_(scale[:, None].to(module.weight.dtype))
        if module.bias is not None:
            module.bias.mul_(scale.to(module.bias.dtype))
        del module._parameters[SCALE_NAME]
        for key, hook in list(module._forward_hooks.items()):
            if hook is _scale_hook:
                del module._forward_hooks[key]
    folded.requires_grad_(False)
    return folded
