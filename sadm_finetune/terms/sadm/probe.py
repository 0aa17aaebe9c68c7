"""sadm-eval's structure probe: does x0_hat still differ from z0 in structure, and can the run's
discriminator tell them apart? Measured by noise level on reference images.

For each probe timestep t: reference images are VAE-encoded (z0), noised to x_t with a fixed seed, and
denoised once by the pipeline's own denoiser (x0_hat, as in training). Reported per t:
- `structure_gap_fixed`: the default structure distance (cosine relations, MSE) seen by a fixed encoder
  that nobody trains (sadm.fixed_structure_gap): whether structure differs at all, with SADM or without.
- `d_pair_cos`: with a `structure_discriminator/` beside the pipeline (what sadm-train saves), the mean
  cosine between D's embeddings of each z0 and its own x0_hat, on the inputs D compared in training (the
  run's `training_config.yaml` options): 1 means D maps them alike, lower means D separates them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)


def _vae_scale_factor(pipe) -> int:
    return getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def native_resolution(pipe) -> int:
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    return int(denoiser.config.sample_size) * _vae_scale_factor(pipe)


def load_discriminator(source: str, device: str):
    """The run's structure discriminator and its SADM options, or (None, None) when the source has none."""
    import yaml

    from .config import SADMConfig
    from .discriminator import StructureDiscriminator

    folder = Path(source).expanduser() / "structure_discriminator"
    if not (folder / "config.json").is_file():
        return None, None
    disc = StructureDiscriminator.from_pretrained(folder, use_safetensors=True).to(device).eval()
    config_file = folder.parent / "training_config.yaml"
    saved = (yaml.safe_load(config_file.read_text()) or {}).get("sadm", {}) if config_file.is_file() else {}
    # D's input options as the run trained it; keys this version does not know are left out.
    options = SADMConfig(**{k: v for k, v in saved.items() if k in SADMConfig.__dataclass_fields__})
    return disc, options


@torch.no_grad()
def _denoise(pipe, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None,
             prompts: list[str] | None) -> torch.Tensor:
    """The denoiser's raw prediction (learned-variance channels dropped), as training calls it."""
    channels = x_t.shape[1]
    if getattr(pipe, "transformer", None) is not None and prompts is None:
        out = pipe.transformer(x_t.to(pipe.transformer.dtype), timestep=t, class_labels=class_labels).sample
    else:
        embeds = pipe.encode_prompt(prompts, x_t.device, 1, False)[0]
        out = pipe.unet(x_t.to(pipe.unet.dtype), t, encoder_hidden_states=embeds).sample
    return out[:, :channels].float()


@torch.no_grad()
def probe(pipe, images: np.ndarray, class_labels: list[int] | None, prompts: list[str] | None,
          timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS, disc=None, sadm_options=None, seed: int = 0,
          batch_size: int = 32) -> dict:
    """uint8 (N, R, R, 3) reference images -> {"timesteps", "structure_gap_fixed", "d_pair_cos"} lists."""
    from ...diffusion.latents import encode
    from ...diffusion.process import DDPMProcess
    from .objective import SADMObjective, fixed_structure_gap

    device = pipe.vae.device
    process = DDPMProcess(pipe.scheduler.config, device)
    objective = SADMObjective(sadm_options, process) if disc is not None else None
    if objective is not None and sadm_options.disc_space == "features":  # D read the encoder's features
        from .feature_space import FeatureSpace

        objective.space = FeatureSpace.from_pretrained(pipe.vae, sadm_options.disc_encoder,
                                                       sadm_options.disc_encoder_resolution)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    z0 = torch.cat([encode(pipe.vae, pixels[i:i + batch_size].to(device), generator=gen)
                    for i in range(0, len(pixels), batch_size)])
    noise = torch.randn(z0.shape, generator=gen).to(device)
    labels = None if class_labels is None else torch.tensor(class_labels, device=device)
    result: dict[str, list] = {"timesteps": list(timesteps), "structure_gap_fixed": [], "d_pair_cos": []}
    for step in timesteps:
        t = torch.full((len(z0),), step, device=device, dtype=torch.long)
        x_t = process.add_noise(z0, noise, t)
        pred = torch.cat([
            _denoise(pipe, x_t[i:i + batch_size], t[i:i + batch_size],
                     None if labels is None else labels[i:i + batch_size],
                     None if prompts is None else prompts[i:i + batch_size])
            for i in range(0, len(z0), batch_size)])
        x0_hat = process.x0_hat(pred, x_t, t)
        result["structure_gap_fixed"].append(float(fixed_structure_gap(z0, x0_hat, torch.ones(len(z0), device=device))))
        if disc is None:
            continue
        real, fake, t_disc = objective.disc_inputs(z0, x0_hat, t, torch.Generator(device=device).manual_seed(seed))
        y = labels if (labels is not None and disc.config.num_classes) else None
        emb_real = disc(real, t_disc, class_labels=y).float()
        emb_fake = disc(fake, t_disc, class_labels=y).float()
        result["d_pair_cos"].append(float((emb_real * emb_fake).sum(dim=1).mean()))
    if disc is None:
        result["d_pair_cos"] = None
    return result


def probe_reference(pipe, source: str, reference, names: dict[int, str], text: bool, config, device: str) -> dict:
    """`probe` on a fixed subset (`config.probe_images`) of the reference images of the sampled classes, with
    the discriminator saved beside `source` if there is one. `config`: sadm-eval's EvalConfig."""
    indices = np.arange(reference.num_images)
    if reference.labels is not None:
        indices = indices[np.isin(reference.labels, list(names))]
    rng = np.random.default_rng(0)  # apart from --seed: the same images whatever the sampling seed
    indices = np.sort(rng.choice(indices, min(config.probe_images, len(indices)), replace=False))
    labels = None if reference.labels is None else [int(c) for c in reference.labels[indices]]
    prompts = None
    if text:
        prompts = [config.prompt_template.format(label=names[c]) for c in labels] if labels else [""] * len(indices)
    elif labels is None:
        labels = [1000] * len(indices)  # an unlabelled reference: DiT's null class
    disc, options = load_discriminator(source, device)
    images = reference.load(indices, native_resolution(pipe))
    return probe(pipe, images, None if text else labels, prompts, tuple(config.probe_timesteps), disc, options,
                 seed=config.seed, batch_size=config.batch_size)
