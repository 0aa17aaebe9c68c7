#!/usr/bin/env python
"""Build the bundled demo base pipeline: a tiny VAE + tiny DiT pretrained on scikit-learn digits.

The result is a stock diffusers ``DiTPipeline`` folder (``model_index.json``, ``transformer/``,
``vae/``, ``scheduler/``, safetensors weights) that ``DiffusionPipeline.from_pretrained`` loads with
no custom code. It is the starting point of the project's demo fine-tune and quality benchmark, so
it is deliberately somewhat under-trained: it draws recognisable digits, with room left to improve.

Steps:
  1. digits (1,797 images, 32x32 RGB, labels 0..9) from ``sadm_finetune.data.digits``;
  2. an ``AutoencoderKL`` (32x32x3 <-> 8x8x4 latents) trained with L1 + MSE reconstruction and a
     small KL term; ``scaling_factor`` is then set to 1 / std of sampled latents on the data set;
  3. a ``DiTTransformer2DModel`` with learned sigma (out_channels = 2 x latent channels, like
     facebook/DiT-XL-2-256), trained with epsilon-prediction MSE on the first 4 output channels,
     DiT's linear beta schedule, and the model's own class-label dropout (null class 1000) so that
     classifier-free guidance works;
  4. ``DiTPipeline(transformer, vae, DDIMScheduler)`` with ``id2label`` for the ten digits, saved
     atomically (temp sibling folder, then rename) with safetensors;
  5. a 4x10 sample grid (columns = classes 0..9) drawn from the *reloaded* folder with stock
     ``DiffusionPipeline.from_pretrained``, written next to the folder as
     ``demo-dit-digits-samples.png`` for a human to look at.

Runs in about 6 minutes on 2 otherwise idle CPU cores with the defaults (VAE ~0.17 s/step at batch
32, DiT ~0.05 s/step at batch 64); on a machine shared with other jobs pass ``--num_threads 1``::

    python scripts/make_demo_base.py [--num_threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT_DIR = "sadm_finetune/assets/demo-dit-digits"
SAMPLES_NAME = "demo-dit-digits-samples.png"

# The noise schedule of facebook/DiT-XL-2-256 (its scheduler/scheduler_config.json): a DDIMScheduler
# over DDPM's linear betas, epsilon prediction, no sample clipping.
DIT_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
)
DDIM_EXTRA = dict(clip_sample=False, set_alpha_to_one=True, steps_offset=0)

NUM_CLASSES = 10
NULL_CLASS_ID = 1000  # DiTPipeline hard-codes 1000 as the unconditional class id


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="pipeline folder to (re)write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae_steps", type=int, default=400, help="AutoencoderKL optimisation steps")
    p.add_argument("--vae_batch_size", type=int, default=32)
    p.add_argument("--vae_lr", type=float, default=2e-3)
    p.add_argument("--kl_weight", type=float, default=1e-5, help="weight of the per-image KL sum")
    p.add_argument("--dit_steps", type=int, default=5000, help="DiT optimisation steps")
    p.add_argument("--batch_size", type=int, default=64, help="DiT batch size")
    p.add_argument("--dit_lr", type=float, default=1e-3)
    p.add_argument("--ema_decay", type=float, default=0.999, help="0 disables the EMA of DiT weights")
    p.add_argument("--dit_heads", type=int, default=4, help="DiT attention heads (width = heads x 32)")
    p.add_argument("--dit_layers", type=int, default=4, help="DiT blocks")
    p.add_argument("--sample_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=1.5)
    p.add_argument("--lr_schedule", choices=("cosine", "constant"), default="cosine",
                   help="DiT learning rate after warm-up: cosine decay to 10%%, or constant")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="train the DiT on these digit classes only (default: all ten); the others keep their "
                   "untrained class embeddings: the base of the method study's transfer regime")
    p.add_argument("--vae_from", default=None,
                   help="reuse the VAE of this pipeline folder instead of training one (study bases share the "
                   "demo VAE, so their latent spaces are the same)")
    p.add_argument("--no_samples", action="store_true", help="skip the sample grid next to the folder")
    p.add_argument(
        "--num_threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: torch's default). Use 1 on a busy machine: with other jobs "
        "competing for 2 cores, 2 threads ran the DiT step ~20x slower than 1 thread did.",
    )
    return p.parse_args(argv)


def load_digits():
    try:
        from sadm_finetune.data.digits import load_digits_images
    except ImportError:  # running from a checkout that is not installed
        sys.path.insert(0, str(REPO_ROOT))
        from sadm_finetune.data.digits import load_digits_images
    return load_digits_images()


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str = "cosine") -> float:
    """Linear warm-up, then cosine decay to 10% of ``base`` (or constant)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def build_transformer(latent_channels: int, latent_size: int, heads: int = 4, layers: int = 4):
    """The bundled demo DiT: 4 heads x 32, 4 blocks (1.94 M parameters); larger ones for the scale study."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=32,
        in_channels=latent_channels,
        out_channels=2 * latent_channels,  # learned sigma, as in facebook/DiT-XL-2-256
        num_layers=layers,
        sample_size=latent_size,
        patch_size=2,
        num_embeds_ada_norm=1000,  # DiTPipeline's null class id is 1000
    )


def train_vae(vae, pixels: torch.Tensor, args, gen: torch.Generator) -> dict:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    n = pixels.shape[0]
    hist = {"l1": [], "mse": [], "kl": []}
    t0 = time.time()
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=50)
        idx = torch.randint(0, n, (args.vae_batch_size,), generator=gen)
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        kl = posterior.kl().mean()  # summed over latent elements, averaged over the batch
        loss = l1 + mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        hist["l1"].append(l1.item())
        hist["mse"].append(mse.item())
        hist["kl"].append(kl.item())
        if (step + 1) % 100 == 0 or step + 1 == args.vae_steps:
            print(
                f"[vae] step {step + 1}/{args.vae_steps} l1 {np.mean(hist['l1'][-100:]):.4f} "
                f"mse {np.mean(hist['mse'][-100:]):.5f} kl {np.mean(hist['kl'][-100:]):.1f} "
                f"({time.time() - t0:.0f}s)",
                flush=True,
            )
    vae.eval()
    return {k: float(np.mean(v[-100:])) for k, v in hist.items()}


@torch.no_grad()
def encode_dataset(vae, pixels: torch.Tensor, batch: int = 256):
    means, stds = [], []
    for i in range(0, pixels.shape[0], batch):
        post = vae.encode(pixels[i : i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_error(vae, pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, gen) -> float:
    z = mean + std * torch.randn(mean.shape, generator=gen)
    errs = [
        (vae.decode(z[i : i + 256]).sample.clamp(-1, 1) - pixels[i : i + 256]).abs().mean().item()
        for i in range(0, z.shape[0], 256)
    ]
    return float(np.mean(errs))


def train_dit(model, lat_mean, lat_std, labels, scaling, args, gen) -> tuple[dict, dict | None]:
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**DIT_SCHEDULE)
    c = lat_mean.shape[1]
    model.train()  # keeps the built-in class-label dropout (p=0.1 -> null class 1000) active
    opt = torch.optim.AdamW(model.parameters(), lr=args.dit_lr, weight_decay=0.0)
    ema = None
    if args.ema_decay > 0:
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n = lat_mean.shape[0]
    hist = []
    t0 = time.time()
    for step in range(args.dit_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.dit_steps, args.dit_lr, warmup=200, schedule=args.lr_schedule)
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        # a fresh posterior sample each step, in the pipeline's scaled latent space
        x0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch_size,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        out = model(xt, timestep=t, class_labels=labels[idx]).sample
        loss = F.mse_loss(out[:, :c], noise)  # epsilon channels; the sigma channels stay untrained
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ema is not None:
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                    else:
                        ema[k].copy_(v)
        hist.append(loss.item())
        if (step + 1) % 250 == 0 or step + 1 == args.dit_steps:
            print(
                f"[dit] step {step + 1}/{args.dit_steps} loss {np.mean(hist[-250:]):.4f} "
                f"({time.time() - t0:.0f}s)",
                flush=True,
            )
    model.eval()
    return {"eps_mse": float(np.mean(hist[-250:]))}, ema


def save_atomically(pipe, output_dir: Path) -> None:
    """Write into a temp sibling folder, then move it into place (old-complete or new-complete)."""
    try:
        from sadm_finetune.utils.fsutil import move_into_place
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        from sadm_finetune.utils.fsutil import move_into_place

    output_dir = output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-new-{output_dir.name}-", dir=output_dir.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # safetensors / mkdtemp create 0600 / 0700 entries; make the bundled assets world-readable
        for root, _dirs, files in os.walk(tmp):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        move_into_place(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sample_grid(output_dir: Path, args) -> Path:
    from diffusers import DiffusionPipeline
    from PIL import Image

    pipe = DiffusionPipeline.from_pretrained(str(output_dir))
    pipe.set_progress_bar_config(disable=True)
    rows = 4
    class_ids = [c for _ in range(rows) for c in range(NUM_CLASSES)]
    gen = torch.Generator().manual_seed(args.seed)
    images = pipe(
        class_labels=class_ids,
        num_inference_steps=args.sample_steps,
        guidance_scale=args.guidance_scale,
        generator=gen,
        output_type="np",
    ).images  # (40, 32, 32, 3) in [0, 1]
    arr = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    h, w = arr.shape[1:3]
    grid = arr.reshape(rows, NUM_CLASSES, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, NUM_CLASSES * w, 3)
    img = Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST)
    out = output_dir.parent / SAMPLES_NAME
    img.save(out)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    from diffusers import DDIMScheduler, DiTPipeline

    # 1. data
    images, labels_np = load_digits()
    if args.classes is not None:
        keep = np.isin(labels_np, args.classes)
        images, labels_np = images[keep], labels_np[keep]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    labels = torch.from_numpy(labels_np).long()
    print(f"digits: {tuple(pixels.shape)} labels {sorted(set(labels_np.tolist()))}", flush=True)

    # 2. VAE
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(args.vae_from) / "vae", use_safetensors=True)
        vae.eval()
        vae_losses = {"l1": float("nan"), "mse": float("nan"), "kl": float("nan")}
        lat_mean, lat_std = encode_dataset(vae, pixels)
        sampled = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=gen)
        scaling = float(vae.config.scaling_factor)
    else:
        vae = build_vae()
        print(f"vae params: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M", flush=True)
        vae_losses = train_vae(vae, pixels, args, gen)
        lat_mean, lat_std = encode_dataset(vae, pixels)
        sampled = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=gen)
        scaling = float(1.0 / sampled.std())
        vae.register_to_config(scaling_factor=scaling)
    rec_l1 = reconstruction_error(vae, pixels, lat_mean, lat_std, gen)
    print(
        f"vae: latents {tuple(lat_mean.shape[1:])}, std {sampled.std():.4f} -> scaling_factor {scaling:.4f}, "
        f"mean posterior std {lat_std.mean():.4f}, dataset recon L1 (sampled z) {rec_l1:.4f}",
        flush=True,
    )

    # 3. DiT
    transformer = build_transformer(lat_mean.shape[1], lat_mean.shape[-1], args.dit_heads, args.dit_layers)
    print(f"dit params: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f} M", flush=True)
    dit_losses, ema = train_dit(transformer, lat_mean, lat_std, labels, scaling, args, gen)
    if ema is not None:
        transformer.load_state_dict(ema)

    # 4. pipeline
    scheduler = DDIMScheduler(**DIT_SCHEDULE, **DDIM_EXTRA)
    id2label = {i: str(i) for i in range(NUM_CLASSES)}
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    pipe.register_to_config(id2label=id2label)
    output_dir = Path(args.output_dir)
    save_atomically(pipe, output_dir)
    size = folder_size(output_dir)
    print(f"saved {output_dir} ({size / 1e6:.2f} MB)", flush=True)

    # 5. samples from the reloaded folder
    if not args.no_samples:
        png = sample_grid(output_dir, args)
        print(f"samples: {png}", flush=True)

    print(
        "summary: "
        f"vae l1 {vae_losses['l1']:.4f} mse {vae_losses['mse']:.5f} kl {vae_losses['kl']:.1f} | "
        f"dit eps-mse {dit_losses['eps_mse']:.4f} | scaling_factor {scaling:.4f} | "
        f"size {size / 1e6:.2f} MB | {time.time() - t_start:.0f}s total",
        flush=True,
    )


if __name__ == "__main__":
    main()
