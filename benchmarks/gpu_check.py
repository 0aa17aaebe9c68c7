#!/usr/bin/env python
"""The GPU check to run the day a GPU is lent: DiT-XL/2 at its real shape, bf16, one GPU, under 8 minutes.

Random weights with the exact facebook/DiT-XL-2-256 transformer config (benchmarks/real_shapes.py), latents
of 4x32x32 (256 px) drawn at random, class labels at random, batch 32, AdamW on fp32 master weights under
bf16 autocast (what `accelerate --mixed_precision bf16` does). The step is the toolkit's: the diffusion
loss on epsilon plus DiT's learned-sigma VLB term (`sadm_finetune.losses`), and for SADM the structure
term of `SADMObjective.generator_loss` on the frozen discriminator, then one D update with
`discriminator_loss` (default D, default SADM settings, lambda at its full 0.01). Arms:

  plain / sdpa       SADM off, PyTorch scaled-dot-product attention (the default)
  sadm  / sdpa       SADM on
  plain / xformers   the same with xformers attention   (skipped with a note if xformers is absent)
  sadm  / xformers

Each arm: 50 steps; the step time is the median of steps 11-50 (CUDA-synchronised), the peak memory is
`torch.cuda.max_memory_allocated` over the arm, and every loss of every step must be finite. It prints one
table and writes benchmarks/results/gpu_check.json. Not part of CI; on a machine without CUDA it exits at
once with one line.

    python benchmarks/gpu_check.py [--batch_size 32] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _arm(sadm: bool, attention: str, batch: int, steps: int, device: str = "cuda", dit_config: dict | None = None,
         ) -> dict:
    """One arm. `device`/`dit_config` exist for the CPU smoke test (tests/test_gpu_check.py) only."""
    import torch
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    from diffusers.training_utils import compute_snr

    from benchmarks.real_shapes import DIT_SCHEDULER, DIT_XL_2_256
    from sadm_finetune.config import SADMConfig
    from sadm_finetune.losses import DiffusionLoss, LearnedSigmaVLB, predicted_original_sample
    from sadm_finetune.models.discriminator import StructureDiscriminator
    from sadm_finetune.noise import DDPMProcess
    from sadm_finetune.sadm import SADMObjective

    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = dit_config or DIT_XL_2_256
    model = DiTTransformer2DModel(**config).to(device).train()
    size, channels = config["sample_size"], config["in_channels"]
    if attention == "xformers":
        model.enable_xformers_memory_efficient_attention()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ddim_only = ("set_alpha_to_one", "steps_offset")
    scheduler = DDPMScheduler(**{k: v for k, v in DIT_SCHEDULER.items() if k not in ddim_only})
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    diffusion, vlb = DiffusionLoss("epsilon"), LearnedSigmaVLB(scheduler.betas, device=device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    if sadm:
        cfg = SADMConfig(structure_gather=False, structure_warmup_steps=0)
        disc = StructureDiscriminator(in_channels=channels, base_channels=cfg.disc_width, num_blocks=cfg.disc_depth,
                                      embed_dim=cfg.disc_embed_dim).to(device)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_learning_rate,
                                  betas=(cfg.disc_adam_beta1, cfg.disc_adam_beta2), weight_decay=cfg.disc_weight_decay)
        objective = SADMObjective(cfg, DDPMProcess(scheduler.config, device))  # D computes in fp32 itself
    times, losses = [], []
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(steps):
        latents = torch.randn(batch, channels, size, size, device=device, generator=gen)
        noise = torch.randn(latents.shape, device=device, generator=gen)
        t = torch.randint(0, 1000, (batch,), device=device, generator=gen)
        labels = torch.randint(0, 1000, (batch,), device=device, generator=gen)
        sync()
        start = time.perf_counter()
        noisy = scheduler.add_noise(latents, noise, t)
        with autocast():
            out = model(noisy, timestep=t, class_labels=labels).sample
        eps, var = out.float().split(channels, dim=1)
        # The loss takes each sample's SNR now (the noise process's `snr`, diffusers' compute_snr).
        loss = diffusion(eps, noise, compute_snr(scheduler, t)).mean() + vlb(eps, var, latents, noisy, t).mean()
        step_losses = {"loss_diffusion": loss.detach()}
        if sadm:
            x0_hat = predicted_original_sample(eps, noisy, t, alphas_cumprod, "epsilon")
            structure, _ = objective.generator_loss(disc, latents, x0_hat, t, None)
            loss = loss + cfg.structure_weight * structure
            step_losses["structure_loss_g"] = structure.detach()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sadm:
            loss_d, _ = objective.discriminator_loss(disc, latents, x0_hat.detach(), t, None)
            loss_d.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            step_losses["loss_d"] = loss_d.detach()
        sync()
        times.append(time.perf_counter() - start)
        losses.append({k: float(v) for k, v in step_losses.items()})
    finite = all(v == v and abs(v) != float("inf") for row in losses for v in row.values())
    result = {
        "step_s_median": statistics.median(times[10:]) if steps > 10 else statistics.median(times),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1024**3 if cuda else float("nan"),
        "all_losses_finite": finite,
        "first_losses": losses[0], "last_losses": losses[-1],
    }
    del model, opt
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); this check needs one GPU, "
              "nothing was run", file=sys.stderr)
        return 1
    from diffusers.utils.import_utils import is_xformers_available

    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "batch_size": args.batch_size,
               "steps": args.steps, "dtype": "bf16 autocast, fp32 master weights", "arms": {}}
    for attention in ("sdpa", "xformers"):
        for sadm in (False, True):
            name = f"{'sadm' if sadm else 'plain'}/{attention}"
            if attention == "xformers" and not is_xformers_available():
                results["arms"][name] = {"skipped": "xformers is not installed (pip install xformers)"}
                continue
            print(f"running {name} ...", flush=True)
            try:
                results["arms"][name] = _arm(sadm, attention, args.batch_size, args.steps)
            except Exception as e:  # noqa: BLE001 - a failing arm is a result, the others still run
                results["arms"][name] = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            torch.cuda.empty_cache()
    print(f"\n{results['device']}, DiT-XL/2 (exact config, random weights), batch {args.batch_size}, "
          f"{args.steps} steps, bf16")
    print(f"{'arm':<16} {'s/step':>8} {'vs plain':>9} {'peak GB':>8} {'losses finite':>14}")
    for name, row in results["arms"].items():
        if "step_s_median" not in row:
            print(f"{name:<16} {row.get('skipped') or row.get('failed')}")
            continue
        plain = results["arms"].get(name.replace("sadm/", "plain/"), {}).get("step_s_median")
        ratio = f"{row['step_s_median'] / plain:.3f}" if plain else "-"
        print(f"{name:<16} {row['step_s_median']:>8.3f} {ratio:>9} {row['peak_memory_gb']:>8.1f} "
              f"{str(row['all_losses_finite']):>14}")
    out = HERE / "results" / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    ok = all(row.get("all_losses_finite", True) and "failed" not in row for row in results["arms"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
