"""Gather across processes keeping the local part differentiable (the SADM relation covers the global batch)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (B, ...) from every rank in rank order -> (world * B, ...).

    The other ranks' parts are constants here; only this rank's slice carries gradient. Every rank
    then computes the same global loss and backpropagates into its own samples, so DDP's gradient
    average must be undone by scaling that loss by the world size (see `training.py`).
    """
    n = world_size()
    if n == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(n)]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts, dim=0)


def max_rank_difference(modules: dict[str, torch.nn.Module]) -> dict[str, float]:
    """Largest difference, over ranks, of a per-module fingerprint of the parameters (sum and sum of
    squares in float64). DDP keeps replicas bit-identical, so anything but 0 is a desync."""
    n = world_size()
    result = {}
    for name, module in modules.items():
        params = [p.detach().double() for p in module.parameters()]
        fingerprint = torch.stack([sum(p.sum() for p in params), sum(p.pow(2).sum() for p in params)])
        if n == 1:
            result[name] = 0.0
            continue
        parts = [torch.empty_like(fingerprint) for _ in range(n)]
        dist.all_gather(parts, fingerprint.contiguous())
        stacked = torch.stack(parts)
        result[name] = float((stacked - stacked[0]).abs().max())
    return result
