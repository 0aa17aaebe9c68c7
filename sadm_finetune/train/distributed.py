"""Gather across processes keeping the local part differentiable (the SADM relation covers the global batch)."""

from __future__ import annotations

from typing import Any

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


# Global state, kept on purpose (docs/design.md, "Global state"): the latest small collectives' work handles (with
# their tensors), held from Python. If a gloo worker thread dropped the last reference, it would need the GIL to
# free tensors created in Python, which deadlocks when the main thread is destroying the process group at that
# moment (seen with 2 CPU processes on torch 2.13). A normal multi-process end never destroys the group (cli.py
# leaves with os._exit), but a crash that escapes `cli.main` leaves the group to the interpreter's teardown, where
# its destructor can run; the race is intermittent, so no passing test run shows this safe to drop. A replaced
# entry is released here, on the main thread.
_RECENT_WORK: dict[str, Any] = {}


def _kept(key: str, work, *tensors) -> None:
    work.wait()
    _RECENT_WORK[key] = (work, tensors)


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if `flag` is True on any rank (one all-reduce of a single number).

    A signal reaches the processes one by one (or only one of them); stopping on the local flag would
    send the ranks into different collectives (a checkpoint barrier on one, a gradient all-reduce on
    the other). Every rank must call this at the same point of the loop."""
    if world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    _kept("any_rank", dist.all_reduce(value, op=dist.ReduceOp.MAX, async_op=True), value)
    return bool(value.item() > 0)


def shared_random_seed(accelerator) -> int:
    """A fresh random seed (0 .. 2**31 - 1), drawn on the main process and the same on every rank (a rank's own
    draw would give each process other noise, data order and discriminator initialisation)."""
    import secrets

    from accelerate.utils import broadcast_object_list

    seed = [secrets.randbelow(2**31)]
    if accelerator.num_processes > 1:
        broadcast_object_list(seed, from_process=0)
    return int(seed[0])


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64: position weights for the fingerprint


def bit_fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """An int64 fingerprint of the exact bits of every parameter: sum over elements of (bits x an odd
    weight depending on the element's position), modulo 2**64. Integer addition is associative, so the
    value does not depend on reduction order (threads, kernels, rank); equal bits give equal values,
    and a changed or moved element changes it (up to a 2**-64 collision)."""
    total = torch.zeros((), dtype=torch.int64, device=_device_of(module))
    offset = 0
    for p in module.parameters():
        bits = p.detach().contiguous().view(_INT_OF_SIZE[p.element_size()]).reshape(-1).to(torch.int64)
        weight = (torch.arange(offset, offset + bits.numel(), dtype=torch.int64, device=bits.device) * _GOLDEN) | 1
        total += (bits * weight).sum()
        offset += bits.numel()
    return total


def replica_differences(modules: dict[str, torch.nn.Module]) -> dict[str, tuple[int, float]]:
    """Per module: (number of parameter elements whose bits differ from rank 0's on some rank, largest
    absolute difference). First one all-gather of `bit_fingerprint`s (exact, order-independent); only for
    a module whose fingerprints differ, rank 0's parameters are broadcast tensor by tensor and compared
    element by element with the local copy. NaN counts as different from anything."""
    n = world_size()
    result = {name: (0, 0.0) for name in modules}
    if n == 1 or not modules:
        return result
    local = torch.stack([bit_fingerprint(m) for m in modules.values()])
    parts = [torch.empty_like(local) for _ in range(n)]
    _kept("replica_fingerprints", dist.all_gather(parts, local, async_op=True), local, *parts)
    gathered = torch.stack(parts).cpu()
    for i, (name, module) in enumerate(modules.items()):
        if bool((gathered[:, i] == gathered[0, i]).all()):
            continue  # bit-identical on every rank
        differing = torch.zeros((), dtype=torch.float64, device=_device_of(module))
        largest = torch.zeros((), dtype=torch.float64, device=_device_of(module))
        for p in module.parameters():
            mine = p.detach().contiguous()
            reference = mine.clone()
            _kept(f"replica_broadcast_{name}", dist.broadcast(reference, src=0, async_op=True), reference)
            bits = _INT_OF_SIZE[mine.element_size()]
            mask = mine.view(bits) != reference.view(bits)
            differing += mask.sum()
            if mask.any():
                gap = (mine[mask].double() - reference[mask].double()).abs().nan_to_num(nan=float("inf"))
                largest = torch.maximum(largest, gap.max())
        stats = torch.stack([differing, largest])
        _kept(f"replica_stats_{name}", dist.all_reduce(stats, op=dist.ReduceOp.MAX, async_op=True), stats)
        result[name] = (int(stats[0].item()), float(stats[1].item()))
    return result


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


# -- FSDP: the denoiser sharded by accelerate, the discriminator replicated beside it (docs/scaling.md) ----------

def is_fsdp(accelerator) -> bool:
    """Whether accelerate shards the denoiser (FSDP 1 or 2). `DistributedType` is a str enum: a stand-in
    accelerator in a test may carry the plain string "FSDP"."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def replicate_outside_fsdp(accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """Under FSDP: D as a plain DDP replica (gradients all-reduced in its own backward), not an FSDP unit.

    accelerate's FSDP2 `prepare` takes one model per call, and its FSDP `save_state` pairs the i-th
    optimizer with the i-th prepared model; so D, its optimizer and scheduler stay out of accelerate's
    lists (training.py stores their state in the checkpoint's safetensors files through
    checkpointing.CheckpointState, not as pickles). Replicated, D's parameters are full tensors outside
    any forward, which the generator phase (functional_call on the unwrapped D) needs.
    """
    from torch.nn.parallel import DistributedDataParallel

    module.to(accelerator.device)
    if accelerator.num_processes == 1:
        return module
    device_ids = [accelerator.device.index] if accelerator.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)  # broadcasts rank 0's weights


def gathered_copy(accelerator, model: torch.nn.Module) -> torch.nn.Module | None:
    """A stock (unsharded) copy of an FSDP-prepared diffusers model on the main process, None elsewhere.

    Every rank must call it (the full state dict is gathered with collectives); the copy is a fresh
    instance of the model's own class (not FSDP2's generated subclass) holding the gathered weights.
    """
    state = accelerator.get_state_dict(model)  # FSDP1: rank0_only; FSDP2: full_state_dict + broadcast
    if not accelerator.is_main_process:
        return None
    from torch.distributed.fsdp import FSDPModule

    inner = accelerator.unwrap_model(model)
    cls = next(c for c in type(inner).__mro__ if not issubclass(c, FSDPModule))
    copy = cls.from_config(inner.config)
    copy.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return copy.to(accelerator.device)
