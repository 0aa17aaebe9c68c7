"""Can a discriminator tell x0_hat from z0 by blur alone? The hypothesis behind SADM's D-input options.

At noise level t the denoiser's x0_hat is close to the posterior mean E[z0 | z_t], which is smoother than
any real z0. If a probe that sees only per-sample frequency energies (no content, no pairing) separates
real from predicted latents, a learned D can too, and the adversary then pushes x0_hat off the posterior
mean. This script measures that probe's held-out accuracy (0.5 = cannot tell) per timestep, for what D sees
by default and under each option that is meant to take the tell away:

- raw:       z0 vs x0_hat (the default formulation)
- lowpass:   the real side Wiener-filtered to the detail x0_hat can carry at t (--disc_real_lowpass)
- renoise:   both sides re-noised to t with one shared noise draw (--disc_renoise 1.0)
- renoise-0.5: both sides re-noised to t/2 (--disc_renoise 0.5)
- pool2:     both sides average-pooled by 2 (--disc_pool 2)

The transforms are the training code's own (`SADMObjective.disc_inputs`).

    python benchmarks/disc_separability.py [--pretrained runs/study/bases/continue]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import write_json  # noqa: E402

VARIANTS = {"raw": {}, "lowpass": {"disc_real_lowpass": True}, "renoise": {"disc_renoise": 1.0},
            "renoise-0.5": {"disc_renoise": 0.5}, "pool2": {"disc_pool": 2}}


def band_energies(z: torch.Tensor, bands: int = 4) -> np.ndarray:
    """(B, C, H, W) -> (B, C * bands) log energy per radial frequency band and channel."""
    spectrum = torch.fft.fft2(z.float(), norm="ortho").abs().pow(2)
    h, w = z.shape[-2:]
    fy = torch.fft.fftfreq(h).abs()[:, None]
    fx = torch.fft.fftfreq(w).abs()[None, :]
    radius = torch.sqrt(fy**2 + fx**2) / np.sqrt(0.5)  # 0 .. 1
    edges = torch.linspace(0, 1.0001, bands + 1)
    feats = [spectrum[..., (radius >= lo) & (radius < hi)].mean(dim=-1) for lo, hi in zip(edges[:-1], edges[1:])]
    return torch.log(torch.stack(feats, dim=-1) + 1e-8).flatten(1).numpy()


def probe_accuracy(real: np.ndarray, fake: np.ndarray, seed: int = 0) -> float:
    """5-fold held-out accuracy of a logistic regression telling real (1) from fake (0)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([real, fake])
    y = np.concatenate([np.ones(len(real)), np.zeros(len(fake))])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(cross_val_score(model, x, y, cv=5).mean())


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default=str(ROOT / "runs" / "study" / "bases" / "continue"))
    parser.add_argument("--timesteps", type=int, nargs="+", default=[20, 100, 250, 500, 750, 950])
    parser.add_argument("--num_samples", type=int, default=1024)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "disc_separability.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    from diffusers import DDPMScheduler, DiffusionPipeline

    from sadm_finetune.terms.sadm.config import SADMConfig
    from sadm_finetune.data.digits import load_digits_images
    from sadm_finetune.diffusion.losses import predicted_original_sample
    from sadm_finetune.diffusion.process import DDPMProcess
    from sadm_finetune.terms.sadm.objective import SADMObjective

    pipe = DiffusionPipeline.from_pretrained(args.pretrained, use_safetensors=True)
    pipe.transformer.eval()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = scheduler.alphas_cumprod
    images, labels = load_digits_images(32)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(images), (args.num_samples,), generator=gen)
    pixels = torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1
    posterior = pipe.vae.encode(pixels).latent_dist
    z0 = posterior.sample(generator=gen) * pipe.vae.config.scaling_factor
    y = torch.from_numpy(labels[idx.numpy()]).long()
    c = z0.shape[1]

    rows = {}
    for t_value in args.timesteps:
        t = torch.full((len(z0),), t_value, dtype=torch.long)
        noise = torch.randn(z0.shape, generator=gen)
        zt = scheduler.add_noise(z0, noise, t)
        x0_hat = torch.cat([
            predicted_original_sample(pipe.transformer(zt[i:i + 256], t[i:i + 256], y[i:i + 256]).sample[:, :c],
                                      zt[i:i + 256], t[i:i + 256], alphas, "epsilon")
            for i in range(0, len(z0), 256)])
        row = {}
        for name, options in VARIANTS.items():
            objective = SADMObjective(SADMConfig(**options), DDPMProcess(pipe.scheduler.config, "cpu"))
            real, fake, _ = objective.disc_inputs(z0, x0_hat, t, torch.Generator().manual_seed(t_value))
            row[name] = probe_accuracy(band_energies(real), band_energies(fake))
        row["fake_to_real_energy_ratio"] = float(x0_hat.pow(2).mean() / z0.pow(2).mean())
        rows[t_value] = row
        print(f"t={t_value:4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)

    write_json(args.output, {"pretrained": Path(args.pretrained).name, "num_samples": args.num_samples,
                             "probe": "logistic regression on per-channel log energy in 4 radial frequency bands, "
                                      "5-fold held-out accuracy (0.5 = chance)", "rows": rows}, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
