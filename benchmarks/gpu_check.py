#!/usr/bin/env python
"""The GPU check to run the day a GPU is lent: the CLI end to end on every family's tiny pipeline, then DiT-XL/2 at
its real shape, bf16, one GPU; about 4-6 minutes on one H200 (estimated: no GPU was lent to this project yet).

**The CLI, end to end** (first, so a dtype or device bug shows within minutes): `sadm-train` in this process
(`sadm_finetune.cli.main`, what `accelerate launch` runs in its child) on the tiny random pipeline of every family
(tests/tiny_*.py: DiT, SD, SDXL, SD3, PixArt-Σ, Flux.1), bf16 and fp16, LoRA and full fine-tune, SADM on (the defaults,
lambda without warm-up), 3 steps each, batch 4: 24 cases; the LoRA cases cache the text embeddings (text
families), the full ones the latents (through the VAE in its mixed-precision dtype). A case passes when the run
exits 0, the final sample grid was written from the reloaded export, and every weight file it wrote is finite.
Per case: pass/fail, seconds and peak GPU memory (`torch.cuda.max_memory_allocated`).

**DiT-XL/2 at its real shape.** Random weights with the exact facebook/DiT-XL-2-256 transformer config
(benchmarks/real_shapes.py), latents of 4x32x32 (256 px) drawn at random, class labels at random, batch 32,
AdamW on fp32 master weights under bf16 autocast (what `accelerate --mixed_precision bf16` does). The step is the toolkit's: the diffusion
loss on epsilon plus DiT's learned-sigma VLB term (`sadm_finetune.diffusion.losses`), and for SADM the structure
term of `SADMObjective.generator_loss` on the frozen discriminator, then one D update with
`discriminator_loss` (default D, default SADM settings, lambda at its full 0.01). Arms:

  plain / sdpa       SADM off, PyTorch scaled-dot-product attention (the default)
  sadm  / sdpa       SADM on
  plain / xformers   the same with xformers attention   (skipped with a note if xformers is absent)
  sadm  / xformers

Each arm: 50 steps; the step time is the median of steps 11-50 (CUDA-synchronised), the peak memory is
`torch.cuda.max_memory_allocated` over the arm, and every loss of every step must be finite. It prints two
tables and writes benchmarks/results/gpu_check.json. Not part of CI; on a machine without CUDA it exits at
once with one line (tests/benchmarks/test_gpu_check.py runs one CLI case and the DiT arm on CPU in fp32).

    python benchmarks/gpu_check.py [--batch_size 32] [--steps 50] [--cli_steps 3] [--skip_cli] [--skip_dit_xl]
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # harness.py, also when imported as benchmarks.gpu_check
from harness import OFFLINE, write_json  # noqa: E402

CLI_FAMILIES = ("dit", "sd", "sdxl", "sd3", "pixart", "flux", "qwen")
CLI_PRECISIONS = ("bf16", "fp16")
CLI_TRAINABLES = ("lora", "full")


def cli_cases(precisions: tuple[str, ...] = CLI_PRECISIONS) -> list[dict]:
    """Every family x precision x trainable, SADM on."""
    return [{"name": f"{family}/{trainable}/{precision}", "family": family, "trainable": trainable,
             "precision": precision} for family in CLI_FAMILIES for precision in precisions
            for trainable in CLI_TRAINABLES]


def _tiny(family: str, root: Path) -> tuple[Path, Path]:
    """(pipeline folder, data folder) of the family's tiny random pipeline (tests/tiny_*.py), built once under root."""
    tests = str(HERE.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    base, data = root / family / "base", root / family / "data"
    if (base / "model_index.json").is_file():
        return base, data
    from tiny_sd import build_captioned_folder

    if family == "dit":
        from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

        build_tiny_dit_pipeline(base, num_classes=2)
        build_image_folder(data)
        return base, data
    builders = {"sd": ("tiny_sd", "build_tiny_sd_pipeline"), "sdxl": ("tiny_sdxl", "build_tiny_sdxl_pipeline"),
                "sd3": ("tiny_sd3", "build_tiny_sd3_pipeline"), "pixart": ("tiny_pixart", "build_tiny_pixart_pipeline"),
                "flux": ("tiny_flux", "build_tiny_flux_pipeline"),
                "qwen": ("tiny_qwen_image", "build_tiny_qwen_image_pipeline")}
    module, name = builders[family]
    getattr(__import__(module), name)(base)
    build_captioned_folder(data)
    return base, data


def _all_finite(out: Path) -> bool:
    """Every safetensors file the run wrote (the export, LoRA files, D; not the checkpoints) holds finite values."""
    import torch
    from safetensors.torch import load_file

    files = [p for p in out.rglob("*.safetensors") if "checkpoints" not in p.parts]
    return bool(files) and all(torch.isfinite(t.float()).all() for p in files for t in load_file(str(p)).values())


def run_cli_case(case: dict, root: Path, steps: int = 3) -> dict:
    """One CLI run, in this process; never raises (a failure is a result). `case["precision"]` may be "no" (the
    CPU test)."""
    import torch

    from launch import _captured, reset_accelerate_state, tiny_run_args  # tests/launch.py
    from sadm_finetune.cli import main

    base, data = _tiny(case["family"], root)
    out = root / "runs" / case["name"].replace("/", "-")
    args = tiny_run_args(base, data, out, steps=steps) + [
        "--trainable", case["trainable"], "--mixed_precision", case["precision"], "--report_to", "none",
        "--overwrite_output_dir"]
    if case["trainable"] == "lora":  # LoRA cases also cache the text embeddings (text families), full ones the latents
        args += ["--lora_rank", "4"] + (["--cache_text_embeddings", "--text_cache_dir", str(root / "text-cache")]
                                        if case["family"] != "dit" else [])
    else:
        args += ["--cache_latents", "--center_crop", "--latent_cache_dir", str(root / "latent-cache")]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stdout, stderr = io.StringIO(), io.StringIO()
    reset_accelerate_state()
    start, error, trace = time.perf_counter(), None, None
    try:
        with _captured(stdout, stderr):
            code = main([str(a) for a in args])
    except Exception as e:  # noqa: BLE001 - a crash is this case's result
        text = str(e).strip()
        code, error = None, f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
        trace = traceback.format_exc()[-2000:]
    finally:
        reset_accelerate_state()
    seconds = time.perf_counter() - start
    row = {"seconds": round(seconds, 2),
           "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 3) if cuda else None}
    if error is None and code != 0:
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        error = f"exit status {code}: " + (lines[-1][:300] if lines else "(no output)")
    if error is None and not (out / "samples" / "final.png").is_file():
        error = "no samples/final.png (the export was not reloaded and sampled)"
    if error is None and not _all_finite(out):
        error = "a written weight file holds non-finite values (or none was written)"
    row.update({"ok": error is None, **({"error": error} if error else {}), **({"traceback": trace} if trace else {})})
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def run_cli_cases(steps: int) -> dict:
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)  # everything is built locally
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-cli-") as tmp:
        os.environ.setdefault("HF_HOME", str(Path(tmp) / "hf_home"))
        for case in cli_cases():
            print(f"running cli {case['name']} ...", flush=True)
            results[case["name"]] = run_cli_case(case, Path(tmp), steps)
    return results


def _arm(sadm: bool, attention: str, batch: int, steps: int, device: str = "cuda", dit_config: dict | None = None,
         ) -> dict:
    """One arm. `device`/`dit_config` exist for the CPU smoke test (tests/benchmarks/test_gpu_check.py) only."""
    import torch
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    from diffusers.training_utils import compute_snr

    from benchmarks.real_shapes import DIT_SCHEDULER, DIT_XL_2_256
    from sadm_finetune.terms.sadm.config import SADMConfig
    from sadm_finetune.diffusion.losses import DiffusionLoss, LearnedSigmaVLB, predicted_original_sample
    from sadm_finetune.terms.sadm.discriminator import StructureDiscriminator
    from sadm_finetune.diffusion.process import DDPMProcess
    from sadm_finetune.terms.sadm.objective import SADMObjective

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
    parser.add_argument("--cli_steps", type=int, default=3, help="training steps of each CLI case")
    parser.add_argument("--skip_cli", action="store_true", help="skip the CLI cases on the tiny pipelines")
    parser.add_argument("--skip_dit_xl", action="store_true", help="skip the DiT-XL/2 arms")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); this check needs one GPU, "
              "nothing was run", file=sys.stderr)
        return 1
    from diffusers.utils.import_utils import is_xformers_available

    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "batch_size": args.batch_size,
               "steps": args.steps, "dtype": "bf16 autocast, fp32 master weights", "arms": {}, "cli": {}}
    started = time.perf_counter()
    if not args.skip_cli:
        results["cli"] = run_cli_cases(args.cli_steps)
        print(f"\nCLI end to end, tiny pipelines, {args.cli_steps} steps, SADM on")
        print(f"{'case':<22} {'result':<6} {'s':>7} {'peak GB':>8}  error")
        for name, row in results["cli"].items():
            peak = f"{row['peak_memory_gb']:.2f}" if row["peak_memory_gb"] is not None else "-"
            print(f"{name:<22} {'pass' if row['ok'] else 'FAIL':<6} {row['seconds']:>7.1f} {peak:>8}  "
                  f"{row.get('error', '')}")
    for attention in () if args.skip_dit_xl else ("sdpa", "xformers"):
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
    if not args.skip_dit_xl:
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
    results["total_s"] = round(time.perf_counter() - started, 1)
    out = write_json(HERE / "results" / "gpu_check.json", results, indent=1)
    print(f"\nwrote {out} ({results['total_s']} s in all)")
    ok = all(row.get("all_losses_finite", True) and "failed" not in row for row in results["arms"].values())
    return 0 if ok and all(row["ok"] for row in results["cli"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
