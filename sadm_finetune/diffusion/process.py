"""The noise process the denoiser was trained with: how to noise, what to predict, how to read x0_hat.

One object per process, chosen from the pipeline's scheduler config (`make_process`), so the training loop
and the loss terms never branch on it. Both processes answer the same calls:

- `sample_timesteps(B, generator, device, latent_shape)`: the step's timesteps, drawn from the step's seeded
  generator (`latent_shape`, (B, C, h, w), sets a dynamic shift's token count; the DDPM process ignores it);
- `add_noise(z0, eps, t)`, `target(z0, eps, t)`, `x0_hat(pred, x_t, t)`;
- `snr(t)`: the signal-to-noise ratio of each sample's noise level (SADM's noise-level weighting and
  Wiener filter);
- `renoise(real, fake, t, factor, generator)`: both sides re-noised to the level `factor` of t with one
  noise draw (SADM's instance noise), returning the timesteps of that level;
- `diffusion_loss(training)`: the per-sample diffusion loss, a callable `(pred, target, t) -> (B,)`.

DDPMProcess: DiT and Stable Diffusion 1.x/2.x/XL (epsilon, v-prediction, sample). FlowMatchProcess:
Stable Diffusion 3 / 3.5 (rectified flow, velocity target), the recipe of diffusers' train_dreambooth_lora_sd3.py.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import (compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3,
                                      compute_snr)

from ..utils.errors import ConfigError
from .losses import DiffusionLoss, _per_t, diffusion_target, masked_mean, predicted_original_sample, snr

UNSUPPORTED_SCHEDULERS = ("EDM", "CMStochastic")  # scheduler class-name prefixes
FLOW_MATCH_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def check_supported(name: str) -> None:
    """One line for a scheduler whose noise process is neither of ours (training it as one would silently learn
    the wrong target)."""
    if name.startswith(UNSUPPORTED_SCHEDULERS) or (name.startswith("FlowMatch") and name not in FLOW_MATCH_SCHEDULERS):
        raise ConfigError("pretrained_model_name_or_path", f"the pipeline's {name} uses a noise process this toolkit "
                          "does not train (EDM, or flow matching other than FlowMatchEulerDiscreteScheduler's)",
                          "fine-tune a DDPM-family pipeline (DiT, Stable Diffusion 1.x/2.x, SDXL) or a "
                          "FlowMatchEulerDiscreteScheduler one (Stable Diffusion 3 / 3.5)")


def make_process(scheduler_config, device: torch.device | str, flow_options=None,
                 latent_patch_size: int = 1) -> "DDPMProcess | FlowMatchProcess":
    """The process of the pipeline's scheduler. `flow_options`: the run's FlowMatchingConfig (defaults if None);
    `latent_patch_size`: latents per image-token side (the adapter's), for a dynamic shift's token count."""
    name = dict(scheduler_config).get("_class_name", "")
    check_supported(name)
    if name in FLOW_MATCH_SCHEDULERS:
        return FlowMatchProcess(scheduler_config, device, flow_options, latent_patch_size)
    return DDPMProcess(scheduler_config, device)


class TimestepLoss:
    """A per-sample loss fed from the timesteps: `loss(pred, target, read(t))`, where `read` gives what the
    weighting needs (DDPM: the SNR, flow matching: sigma)."""

    def __init__(self, loss: Callable, read: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.loss, self.read = loss, read

    def __call__(self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,); `mask`: the latent loss mask (B, 1, h, w) of masked training, or None (losses.masked_mean)."""
        return self.loss(model_pred, target, self.read(timesteps), mask)


class DDPMProcess:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps over the pipeline's own discrete schedule."""

    def __init__(self, scheduler_config, device: torch.device | str) -> None:
        name = dict(scheduler_config).get("_class_name", "")
        check_supported(name)
        if name in FLOW_MATCH_SCHEDULERS:
            raise ConfigError("pretrained_model_name_or_path", f"the pipeline's {name} is a flow-matching scheduler, "
                              "not a DDPM one", "build the process with noise.make_process (FlowMatchProcess)")
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.scheduler.config.prediction_type
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.betas = self.scheduler.betas

    def sample_timesteps(self, batch_size: int, generator: torch.Generator, device: torch.device,
                         latent_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return diffusion_target(latents, noise, timesteps, self.alphas_cumprod, self.prediction_type)

    def x0_hat(self, model_pred: torch.Tensor, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The predicted clean latents, differentiable in `model_pred`."""
        return predicted_original_sample(model_pred, noisy_latents, timesteps, self.alphas_cumprod,
                                         self.prediction_type)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """ab_t / (1 - ab_t), (B,) fp32."""
        return snr(timesteps, self.alphas_cumprod)

    def renoise(self, real: torch.Tensor, fake: torch.Tensor, timesteps: torch.Tensor, factor: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both sides at s = floor(factor * t), one shared noise draw."""
        t_disc = torch.floor(timesteps.float() * factor).long()
        ab = _per_t(self.alphas_cumprod, t_disc, real.ndim)
        noise = torch.randn(real.shape, generator=generator, device=real.device, dtype=torch.float32)
        out = [(ab.sqrt() * x.float() + (1 - ab).sqrt() * noise).to(real.dtype) for x in (real, fake)]
        return out[0], out[1], t_disc

    def diffusion_loss(self, training) -> TimestepLoss:
        """MSE to the target, min-SNR-gamma weighted with --snr_gamma (diffusers' `compute_snr`)."""
        return TimestepLoss(DiffusionLoss(self.prediction_type, training.snr_gamma),
                            lambda t: compute_snr(self.scheduler, t))


class FlowMatchProcess:
    """Rectified flow (SD3): x_t = (1 - sigma) x0 + sigma eps, the denoiser predicts the velocity eps - x0.

    Timesteps are the scheduler's own training timesteps (`scheduler.timesteps`, sigma * 1000 after the
    config's `shift`), drawn as diffusers' SD3 scripts draw them: u from `compute_density_for_timestep_sampling`
    (--weighting_scheme, --logit_mean, --logit_std, --mode_scale), index = int(u * N).

    --precondition_outputs (SD3's family default, as train_dreambooth_lora_sd3.py): the loss compares the
    prediction converted to clean latents, x0_hat = x_t - sigma v_hat, with the latents. Since
    x0_hat - x0 = -sigma (v_hat - (eps - x0)), that is the velocity loss weighted by sigma^2, which is how it is
    computed (the same value without the cancellation x_t - x0 suffers at small sigma); `target` stays the velocity
    and `x0_hat` means the same in both modes, so the loss terms (SADM) see the same x0_hat either way.

    A scheduler with `use_dynamic_shifting` (Flux.1) holds unshifted sigmas; its pipeline shifts them per image at
    sampling, `time_shift(mu, 1, sigma)` with mu = `calculate_shift(image tokens)` (pipeline_flux.py). Training
    does the same: the drawn index picks the unshifted sigma, which is shifted with the batch's mu (its latent
    grid over `latent_patch_size`^2), and the timestep is sigma * N, as the pipeline's own timesteps are; `sigma(t)`
    is then t / N. (diffusers' train_dreambooth_lora_flux.py draws the unshifted sigmas: docs/defaults.md.)"""

    prediction_type = "flow_matching"
    betas = None  # no variance schedule: DiT's learned-sigma bound does not apply

    def __init__(self, scheduler_config, device: torch.device | str, options=None, latent_patch_size: int = 1) -> None:
        from .flow_config import FlowMatchingConfig

        self.options = options or FlowMatchingConfig()
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.timesteps = self.scheduler.timesteps.to(device)  # (N,) descending, float32
        self.sigmas = self.scheduler.sigmas[:self.num_train_timesteps].to(device)  # sigmas[i] <-> timesteps[i]
        self.dynamic_shift = bool(self.scheduler.config.use_dynamic_shifting)
        self.latent_patch_size = latent_patch_size

    def mu(self, latent_shape: tuple[int, ...]) -> float:
        """The pipeline's dynamic shift for images of `latent_shape` (B, C, h, w): `calculate_shift` of its token
        count with the scheduler's settings, as FluxPipeline.__call__ computes it."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.scheduler.config
        tokens = (latent_shape[-2] // self.latent_patch_size) * (latent_shape[-1] // self.latent_patch_size)
        return calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def sample_timesteps(self, batch_size: int, generator: torch.Generator, device: torch.device,
                         latent_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        o = self.options
        u = compute_density_for_timestep_sampling(o.weighting_scheme, batch_size, o.logit_mean, o.logit_std,
                                                  o.mode_scale, device=device, generator=generator)
        # u = 1 (possible under "mode") would index past the end: clamp to the last timestep.
        indices = (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        if not self.dynamic_shift:
            return self.timesteps.to(device)[indices]
        if latent_shape is None:
            raise ValueError("a dynamically shifted schedule needs the latents' shape for its shift")
        sigmas = self.scheduler.time_shift(self.mu(latent_shape), 1.0, self.sigmas.to(device)[indices])
        return sigmas * self.num_train_timesteps

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) sigma of each timestep, looked up in the schedule (no host sync; exact for its own timesteps); t / N
        for a dynamically shifted schedule (whose timesteps are sigma * N, off the unshifted table)."""
        if self.dynamic_shift:
            return timesteps.float() / self.num_train_timesteps
        schedule = self.timesteps.to(timesteps.device)
        index = (schedule[None, :] == timesteps.float()[:, None]).int().argmax(dim=1)
        return self.sigmas.to(timesteps.device)[index]

    def _sigma(self, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
        return self.sigma(timesteps).reshape(-1, *([1] * (ndim - 1)))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        s = self._sigma(timesteps, latents.ndim).to(latents.dtype)  # as diffusers' SD3 script: the latents' dtype
        return (1.0 - s) * latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def x0_hat(self, model_pred: torch.Tensor, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t - sigma v_hat: the Euler step from sigma to 0, differentiable in `model_pred`."""
        return noisy_latents - self._sigma(timesteps, noisy_latents.ndim) * model_pred

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """((1 - sigma) / sigma)^2, (B,) fp32."""
        s = self.sigma(timesteps).float()
        return ((1.0 - s) / s).pow(2)

    def renoise(self, real: torch.Tensor, fake: torch.Tensor, timesteps: torch.Tensor, factor: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both sides at sigma_s = factor * sigma_t, one shared noise draw; D's timesteps sigma_s * N."""
        s = self._sigma(timesteps, real.ndim) * factor
        noise = torch.randn(real.shape, generator=generator, device=real.device, dtype=torch.float32)
        out = [((1.0 - s) * x.float() + s * noise).to(real.dtype) for x in (real, fake)]
        return out[0], out[1], s.flatten() * self.num_train_timesteps

    def diffusion_loss(self, training) -> TimestepLoss:
        """MSE to the velocity, each sample weighted by `compute_loss_weighting_for_sd3(scheme, sigma)`; with
        --precondition_outputs the MSE of x0_hat to the latents (sigma^2 times the velocity MSE). --snr_gamma never
        reaches here: a flow-matching family lacks the "ddpm" capability, so the config check refuses it."""
        scheme, precondition = self.options.weighting_scheme, self.options.precondition_outputs

        def loss(model_pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
            per_sample = masked_mean((model_pred.float() - target.float()).pow(2), mask)
            if precondition:
                per_sample = per_sample * sigmas.float().pow(2)  # |x0_hat - x0|^2 = sigma^2 |v_hat - v|^2
            return per_sample * compute_loss_weighting_for_sd3(scheme, sigmas.float())

        return TimestepLoss(loss, self.sigma)
