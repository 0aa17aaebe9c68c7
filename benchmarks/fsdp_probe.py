#!/usr/bin/env python
"""What works under FSDP (version 1), probed on two CPU processes over gloo: the facts docs/scaling.md cites.

Three probes, each for FULL_SHARD, SHARD_GRAD_OP and NO_SHARD, with `use_orig_params=True` as accelerate
sets it:

  train      a tiny diffusers DiT wrapped per BasicTransformerBlock (fsdp.yaml's policy) and, for
             comparison, as one root unit: three forward/backward/AdamW steps through the FSDP wrapper.
  unwrapped  after training (either wrap), a direct call of the unwrapped DiT (accelerate's `unwrap_model`), which is
             what validation sampling and export do.
  g_phase    the structure discriminator wrapped as one unit, one forward/backward through the wrapper, then
             the toolkit's generator phase: `SADMObjective.generator_loss` on the unwrapped module (its
             parameters passed detached through torch.func.functional_call).

    python benchmarks/fsdp_probe.py          # ~1-2 minutes on 2 cores
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py
from harness import write_json  # noqa: E402

STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:90]}"


def _dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)


def _probe(rank: int, world: int, port: int, queue) -> None:
    from accelerate.utils import extract_model_from_parallel
    from diffusers import DDPMScheduler
    from diffusers.models.attention import BasicTransformerBlock
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from sadm_finetune.terms.sadm.config import SADMConfig
    from sadm_finetune.terms.sadm.discriminator import StructureDiscriminator
    from sadm_finetune.diffusion.process import DDPMProcess
    from sadm_finetune.terms.sadm.objective import SADMObjective

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cpu = torch.device("cpu")
    x, t, y = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randint(0, 10, (2,))
    results = {}
    for strategy in STRATEGIES:
        kwargs = dict(sharding_strategy=getattr(ShardingStrategy, strategy), use_orig_params=True, device_id=cpu)
        for wrap in ("block", "root"):
            policy = (functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={BasicTransformerBlock})
                      if wrap == "block" else None)
            model = FSDP(_dit(), auto_wrap_policy=policy, **kwargs)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            try:
                for _ in range(3):
                    model(x, timestep=t, class_labels=y).sample.pow(2).mean().backward()
                    opt.step()
                    opt.zero_grad()
                results[f"train/{wrap}/{strategy}"] = "ok"
            except Exception as e:  # noqa: BLE001 - the probe reports whatever breaks
                results[f"train/{wrap}/{strategy}"] = _short(e)
                continue
            try:
                with torch.no_grad():
                    extract_model_from_parallel(model)(x, timestep=t, class_labels=y)
                results[f"unwrapped/{wrap}/{strategy}"] = "ok"
            except Exception as e:  # noqa: BLE001
                results[f"unwrapped/{wrap}/{strategy}"] = _short(e)

        torch.manual_seed(0)
        disc = FSDP(StructureDiscriminator(in_channels=4, base_channels=8, num_blocks=2, embed_dim=16), **kwargs)
        disc(x, t).sum().backward()
        process = DDPMProcess(DDPMScheduler(beta_schedule="linear").config, "cpu")
        objective = SADMObjective(SADMConfig(structure_gather=False), process)
        x0_hat = torch.randn(2, 4, 8, 8, requires_grad=True)
        try:
            loss, _ = objective.generator_loss(extract_model_from_parallel(disc), x, x0_hat, t, None)
            loss.backward()
            results[f"g_phase/{strategy}"] = "ok"
        except Exception as e:  # noqa: BLE001
            results[f"g_phase/{strategy}"] = _short(e)
    queue.put((rank, results))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_probe, args=(2, port, queue), nprocs=2, join=True, start_method="spawn")
    by_rank = dict(queue.get(timeout=60) for _ in range(2))
    if by_rank[0] != by_rank[1]:
        print("ranks disagree:", json.dumps(by_rank, indent=1))
    print(f"torch {torch.__version__}, 2 CPU processes (gloo), FSDP1, use_orig_params=True")
    print(f"{'probe':<34} {'FULL_SHARD':<26} {'SHARD_GRAD_OP':<26} {'NO_SHARD':<26}")
    rows = ["train/block", "unwrapped/block", "train/root", "unwrapped/root", "g_phase"]
    labels = {"train/block": "train, wrap per DiT block", "unwrapped/block": "  then call the unwrapped DiT",
              "train/root": "train, one root unit", "unwrapped/root": "  then call the unwrapped DiT",
              "g_phase": "G phase on unwrapped D"}
    for row in rows:
        cells = [by_rank[0].get(f"{row}/{s}", "-") for s in STRATEGIES]
        print(f"{labels[row]:<34} " + " ".join(f"{c[:25]:<26}" for c in cells))
    out = write_json(Path(__file__).resolve().parent / "results" / "fsdp_probe.json",
                     {"torch": torch.__version__, "processes": 2, "backend": "gloo", "fsdp_version": 1,
                      "results": by_rank[0], "ranks_agree": by_rank[0] == by_rank[1]}, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(main())
