#!/usr/bin/env python
"""Micro-benchmarks of the SADM-specific pieces of a step, each alone, with candidate rewrites.

Every number is a median over `--reps` repetitions (after 2 warm-up calls) of process CPU time and wall
time. Discriminators (`--models`): tiny = the demo recipe's (width 16, depth 2, embed 64) on 4x8x8 latents;
dit-s = SADMConfig's defaults (32, 3, 128) on 4x32x32; dit-xl-recipe = configs/dit-xl-2-256-imagenet.yaml's
(64, 3, 256) on 4x32x32. Batch 32, one torch thread by default. Parts:

  disc        the structure discriminator's cost per step, split as the toolkit runs it: G phase (D in
              eval mode, parameters passed detached through torch.func.functional_call, forward over
              [real; fake] = 2B and backward into x0_hat), D phase (train-mode forward over 2B, backward
              into D's weights), D's AdamW step and grad-norm clipping.
  functional  the G phase with functional_call vs a direct call of the same module whose parameters
              do not require grad (what functional_call buys: D frozen without toggling requires_grad).
  real_half   G phase: one forward over [real; fake] with grad flowing into the whole 2B input, vs
              D(real) under no_grad + D(fake) with grad (the real half needs no input gradient).
  fused       G phase + D phase as two forwards (today) vs one forward whose graph serves both players
              (a gradient-reversal prototype: L_S backpropagates into x0_hat scaled by lambda and into
              D's weights negated), i.e. what a fused step would save.
  loss        the structure loss (relation + distance + logs) forward + backward at B = 32 .. 4096,
              today's boolean-mask mean vs a multiply-by-mask mean (no nonzero, no copy, no host sync
              on CUDA), with peak RSS above the base.
  misc        per-step bookkeeping: the generator re-seed (sha256 + manual_seed), torch.eye per loss
              call, the VLB term, logs to floats, a tensorboard log of the step's scalars.

    python benchmarks/sadm_overheads.py     # ~2 minutes; writes benchmarks/results/sadm_overheads.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import answer, offline_env, proc_status_kb, reset_peak_rss, spawn_worker, write_json  # noqa: E402
from step_time import DEMO_SADM  # noqa: E402

from sadm_finetune.terms.sadm.config import SADMConfig  # noqa: E402
from sadm_finetune.terms.sadm.relations import StructureLoss, structure_sample_weights  # noqa: E402
from sadm_finetune.terms.sadm.discriminator import StructureDiscriminator  # noqa: E402
from sadm_finetune.diffusion.process import DDPMProcess  # noqa: E402
from sadm_finetune.terms.sadm.objective import SADMObjective  # noqa: E402

from diffusers import DDPMScheduler  # noqa: E402


def measure(fn, reps: int, warmup: int = 2) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"cpu_s": statistics.median(cpus), "wall_s": statistics.median(walls),
            "cpu_min_s": min(cpus), "cpu_max_s": max(cpus)}


def _fmt(name: str, m: dict) -> str:
    return f"  {name:<52} CPU {1e3 * m['cpu_s']:>9.3f} ms  wall {1e3 * m['wall_s']:>9.3f} ms"


# ---------------------------------------------------------------------------------------------


# Which discriminator: the demo recipe's (tiny, 8x8 latents), SADMConfig's defaults (dit-s, 32x32 latents),
# configs/dit-xl-2-256-imagenet.yaml's (dit-xl-recipe: width 64, depth 3, embed 256, 32x32 latents).
DISC_CONFIGS = {"tiny": DEMO_SADM, "dit-s": {}, "dit-xl-recipe": dict(disc_width=64, disc_depth=3, disc_embed_dim=256)}


def _setup(model: str, batch_size: int):
    """D, its optimizer, the objective and a (latents, x0_hat, timesteps) batch as a step sees them."""
    cfg = SADMConfig(**DISC_CONFIGS[model])
    size = 8 if model == "tiny" else 32
    torch.manual_seed(0)
    disc = StructureDiscriminator(in_channels=4, base_channels=cfg.disc_width, num_blocks=cfg.disc_depth,
                                  embed_dim=cfg.disc_embed_dim, spectral_norm=cfg.disc_spectral_norm).train()
    opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_learning_rate, betas=(0.5, 0.999), weight_decay=1e-4)
    objective = SADMObjective(cfg, DDPMProcess(DDPMScheduler(beta_schedule="linear").config, "cpu"))
    latents = torch.randn(batch_size, 4, size, size)
    model_pred = torch.randn(batch_size, 4, size, size, requires_grad=True)  # stands in for the denoiser output
    timesteps = torch.randint(0, 1000, (batch_size,))
    return cfg, disc, opt, objective, latents, model_pred, timesteps


def part_disc(model, batch_size, reps, out):
    cfg, disc, opt, objective, latents, model_pred, timesteps = _setup(model, batch_size)
    n_params = sum(p.numel() for p in disc.parameters())

    def g_phase():
        x0_hat = model_pred * 1.0
        loss, _ = objective.generator_loss(disc, latents, x0_hat, timesteps, None)
        (0.01 * loss).backward()
        model_pred.grad = None

    def d_phase():
        loss, _ = objective.discriminator_loss(disc, latents, model_pred.detach(), timesteps, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(disc.parameters(), float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = {"disc_params": n_params, "G phase (fwd 2B eval + bwd to x0_hat)": measure(g_phase, reps),
           "D phase (fwd 2B + bwd + clip + AdamW)": measure(d_phase, reps)}
    print(f"[disc] {model}: D with {n_params / 1e6:.3f} M params, batch {batch_size}")
    for k, v in res.items():
        if isinstance(v, dict):
            print(_fmt(k, v))
    out["disc"][model] = res


def part_functional(model, batch_size, reps, out):
    cfg, disc, opt, objective, latents, model_pred, timesteps = _setup(model, batch_size)

    def via_functional_call():
        x0_hat = model_pred * 1.0
        loss, _ = objective.generator_loss(disc, latents, x0_hat, timesteps, None)
        loss.backward()
        model_pred.grad = None

    frozen = StructureDiscriminator(**disc.config).train()
    frozen.load_state_dict(disc.state_dict())
    frozen.requires_grad_(False)

    def direct_frozen():
        x0_hat = model_pred * 1.0
        frozen.eval()
        both = torch.cat([latents, x0_hat])
        emb_real, emb_fake = frozen(both, torch.cat([timesteps, timesteps])).chunk(2)
        frozen.train()
        loss, _ = objective._loss(emb_real.detach(), emb_fake, timesteps)
        loss.backward()
        model_pred.grad = None

    params = {name: p.detach() for name, p in disc.named_parameters()}
    from torch.func import functional_call

    def functional_forward_only():
        with torch.no_grad():
            functional_call(disc, params, (latents, timesteps))

    def direct_forward_only():
        with torch.no_grad():
            frozen(latents, timesteps)

    res = {"G phase via functional_call (today)": measure(via_functional_call, reps),
           "G phase, direct call, requires_grad off": measure(direct_frozen, reps),
           "no_grad forward B via functional_call": measure(functional_forward_only, reps),
           "no_grad forward B, direct call": measure(direct_forward_only, reps)}
    print(f"[functional] {model}, batch {batch_size}")
    for k, v in res.items():
        print(_fmt(k, v))
    out["functional"][model] = res


def part_real_half(model, batch_size, reps, out):
    cfg, disc, opt, objective, latents, model_pred, timesteps = _setup(model, batch_size)
    from torch.func import functional_call

    params = {name: p.detach() for name, p in disc.named_parameters()}

    def call(z, t):
        return functional_call(disc, params, (z, t))

    def cat_today():
        x0_hat = model_pred * 1.0
        disc.eval()
        emb_real, emb_fake = call(torch.cat([latents, x0_hat]), torch.cat([timesteps, timesteps])).chunk(2)
        disc.train()
        loss, _ = objective._loss(emb_real.detach(), emb_fake, timesteps)
        loss.backward()
        model_pred.grad = None

    def split_real_no_grad():
        x0_hat = model_pred * 1.0
        disc.eval()
        with torch.no_grad():
            emb_real = call(latents, timesteps)
        emb_fake = call(x0_hat, timesteps)
        disc.train()
        loss, _ = objective._loss(emb_real, emb_fake, timesteps)
        loss.backward()
        model_pred.grad = None

    res = {"G phase, [real; fake] in one call (today)": measure(cat_today, reps),
           "G phase, D(real) no_grad + D(fake)": measure(split_real_no_grad, reps)}
    print(f"[real_half] {model}, batch {batch_size}")
    for k, v in res.items():
        print(_fmt(k, v))
    out["real_half"][model] = res


class _ReverseGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale` (negative: gradient reversal)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def part_fused(model, batch_size, reps, out):
    """Today: G phase (eval-mode D, grad into x0_hat) then D phase (train-mode D, grad into D). Fused
    prototype: one train-mode forward; L_S backpropagates into D's weights (negated: D maximises) and,
    through a gradient-reversal node, into x0_hat scaled by -lambda. Not identical to today's step
    (spectral-norm power iteration runs once, D sees x0_hat before the G update either way)."""
    cfg, disc, opt, objective, latents, model_pred, timesteps = _setup(model, batch_size)
    lam = 0.01

    def two_phases():
        x0_hat = model_pred * 1.0
        loss_g, _ = objective.generator_loss(disc, latents, x0_hat, timesteps, None)
        (lam * loss_g).backward()
        loss_d, _ = objective.discriminator_loss(disc, latents, x0_hat.detach(), timesteps, None)
        loss_d.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model_pred.grad = None

    def fused():
        x0_hat = model_pred * 1.0
        x_in = _ReverseGrad.apply(x0_hat, -lam)  # the denoiser minimises lam * L_S: d/dx0 = lam * dL_S/dx0
        both = torch.cat([latents, x_in])
        emb_real, emb_fake = disc(both, torch.cat([timesteps, timesteps])).chunk(2)
        structure, _ = objective._loss(emb_real, emb_fake, timesteps)
        (-structure).backward()  # D's grads: -dL_S/dphi (maximise); x0_hat's: -(-lam) dL_S/dx0
        opt.step()
        opt.zero_grad(set_to_none=True)
        model_pred.grad = None

    res = {"G phase + D phase, two forwards (today)": measure(two_phases, reps),
           "fused: one forward, gradient reversal": measure(fused, reps)}
    print(f"[fused] {model}, batch {batch_size}")
    for k, v in res.items():
        print(_fmt(k, v))
    out["fused"][model] = res


class MaskedMeanStructureLoss(StructureLoss):
    """Prototype of StructureLoss.__call__ for cosine/euclidean/rbf + mse/l1 without boolean indexing:
    off-diagonal means as (x * mask).sum() / (B (B - 1)). Same value; no nonzero(), no gathered copy."""

    def __call__(self, real_embeddings, fake_embeddings, sample_weights):
        b = real_embeddings.shape[0]
        e_r, e_f = real_embeddings.float(), fake_embeddings.float()
        r_real, r_fake = e_r @ e_r.T, e_f @ e_f.T  # cosine
        off = 1.0 - torch.eye(b, device=r_real.device)
        n = b * (b - 1)
        w = sample_weights.float()
        diff = r_real - r_fake
        per_pair = diff.pow(2) if self.distance == "mse" else diff.abs()
        pair_w = torch.sqrt(w[:, None] * w[None, :]) * off
        loss = (pair_w * per_pair).sum() / n
        logs = {"relation_real_mean": ((r_real * off).sum() / n).detach(),
                "relation_fake_mean": ((r_fake * off).sum() / n).detach()}
        return loss, logs


def _loss_peak_worker(b: int, dim: int, name: str) -> float:
    """One loss fwd+bwd in this (fresh) process: peak RSS above the base, in MB."""
    ac = DDPMScheduler(beta_schedule="linear").alphas_cumprod
    loss_fn = StructureLoss("cosine", "mse") if name == "today" else MaskedMeanStructureLoss("cosine", "mse")
    g = torch.Generator().manual_seed(b)
    real = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1)
    fake = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1).requires_grad_(True)
    w = structure_sample_weights(torch.randint(0, 1000, (b,), generator=g), ac, "min_snr")
    gc.collect()
    if not reset_peak_rss():
        raise RuntimeError("/proc/self/clear_refs refused: the peak would include the set-up")
    base = proc_status_kb("VmRSS")
    loss, _ = loss_fn(real, fake, w)
    loss.backward()
    return (proc_status_kb("VmHWM") - base) / 1024


def _loss_peak_mb(b: int, dim: int, name: str) -> float:
    # A fresh process with a fixed mmap threshold: every allocation >= 64 KiB is its own mapping, returned to
    # the OS when freed, so the resident high-water mark follows the live tensors (no malloc-cache reuse).
    env = offline_env(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    return float(spawn_worker(__file__, "--_loss_worker", [b, dim, name], f"loss worker {name} B={b}", env))


def part_loss(sizes, dim, reps, out):
    ac = DDPMScheduler(beta_schedule="linear").alphas_cumprod
    today, masked = StructureLoss("cosine", "mse"), MaskedMeanStructureLoss("cosine", "mse")
    rows = []
    print(f"[loss] structure loss fwd+bwd, embeddings (B, {dim}), cosine / mse / min-SNR weights")
    for b in sizes:
        g = torch.Generator().manual_seed(b)
        real = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1)
        fake0 = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1)
        t = torch.randint(0, 1000, (b,), generator=g)
        w = structure_sample_weights(t, ac, "min_snr")
        row = {"B": b, "relation_entries": b * b, "embedding_bytes_fp32": b * dim * 4}
        for name, loss_fn in (("today", today), ("masked_mean", masked)):
            fake = fake0.clone().requires_grad_(True)

            def run():
                loss, _ = loss_fn(real, fake, w)
                loss.backward()
                fake.grad = None

            r = max(3, reps if b <= 1024 else reps // 4)
            row[name] = {**measure(run, r, warmup=1), "peak_above_base_mb": _loss_peak_mb(b, dim, name)}
        fa, fb = fake0.clone().requires_grad_(True), fake0.clone().requires_grad_(True)
        check_a, _ = today(real, fa, w)
        check_b, _ = masked(real, fb, w)
        check_a.backward()
        check_b.backward()
        row["max_abs_diff"] = float((check_a - check_b).abs().detach())
        row["max_abs_grad_diff"] = float((fa.grad - fb.grad).abs().max())
        rows.append(row)
        today_row, masked_row = row["today"], row["masked_mean"]
        print(f"  B={b:>5}: today CPU {1e3 * today_row['cpu_s']:>9.2f} ms, +{today_row['peak_above_base_mb']:>7.1f} MB"
              f" | masked mean CPU {1e3 * masked_row['cpu_s']:>9.2f} ms, +{masked_row['peak_above_base_mb']:>7.1f} MB"
              f" | |diff| {row['max_abs_diff']:.1e}, grad {row['max_abs_grad_diff']:.1e}")
    out["loss"] = {"embed_dim": dim, "rows": rows}


def part_misc(reps, out):
    import hashlib

    from sadm_finetune.diffusion.losses import LearnedSigmaVLB

    res = {}
    gen = torch.Generator()

    def reseed():
        digest = hashlib.sha256("-".join(str(p) for p in (0, 0, 3, 1234)).encode()).digest()
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))

    res["generator re-seed (sha256 + manual_seed)"] = measure(reseed, reps * 10)
    res["torch.eye(32, bool) x2 (per loss call)"] = measure(lambda: (torch.eye(32, dtype=torch.bool),
                                                                     torch.eye(32, dtype=torch.bool)), reps * 10)
    logs = {f"k{i}": torch.tensor(float(i)) for i in range(14)}
    res["logs -> floats (14 scalars)"] = measure(
        lambda: {k: float(v) for k, v in zip(logs, torch.stack([v.float().cpu() for v in logs.values()]).tolist())},
        reps * 10)
    sched = DDPMScheduler(beta_schedule="linear")
    vlb = LearnedSigmaVLB(sched.betas)
    for size in (8, 32):
        eps = torch.randn(32, 4, size, size)
        var = torch.randn(32, 4, size, size, requires_grad=True)
        lat, noisy = torch.randn(32, 4, size, size), torch.randn(32, 4, size, size)
        t = torch.randint(0, 1000, (32,))

        def run_vlb():
            vlb(eps, var, lat, noisy, t).mean().backward()
            var.grad = None

        res[f"VLB term fwd+bwd, latents 4x{size}x{size}, B 32"] = measure(run_vlb, reps)
    try:
        from torch.utils.tensorboard import SummaryWriter

        with tempfile.TemporaryDirectory() as tmp:
            writer = SummaryWriter(tmp)
            step = {"n": 0}
            scalars = {f"k{i}": float(i) for i in range(14)}

            def tb_log():
                step["n"] += 1
                for k, v in scalars.items():
                    writer.add_scalar(k, v, global_step=step["n"])

            res["tensorboard add_scalar x14 (accelerator.log)"] = measure(tb_log, reps * 10)
            writer.close()
    except ImportError:
        pass
    print("[misc]")
    for k, v in res.items():
        print(_fmt(k, v))
    out["misc"] = res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="all", help="comma-separated: disc,functional,real_half,fused,loss,misc")
    p.add_argument("--models", default="tiny,dit-s,dit-xl-recipe", help=f"from {', '.join(DISC_CONFIGS)}")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--loss_sizes", default="32,256,1024,4096")
    p.add_argument("--embed_dim", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "sadm_overheads.json")
    p.add_argument("--_loss_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._loss_worker:
        answer(_loss_peak_worker, args._loss_worker)
        return
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(",")) if args.parts != "all" else {"disc", "functional", "real_half", "fused",
                                                                    "loss", "misc"}
    out = {"threads": args.threads, "batch_size": args.batch_size, "torch": torch.__version__,
           "disc": {}, "functional": {}, "real_half": {}, "fused": {}}
    for model in args.models.split(","):
        for name, fn in (("disc", part_disc), ("functional", part_functional), ("real_half", part_real_half),
                         ("fused", part_fused)):
            if name in parts:
                fn(model, args.batch_size, args.reps, out)
    if "loss" in parts:
        part_loss([int(s) for s in args.loss_sizes.split(",")], args.embed_dim, args.reps, out)
    if "misc" in parts:
        part_misc(args.reps, out)
    if args.json:
        write_json(args.json, out, indent=1)


if __name__ == "__main__":
    main()
