"""The noise process the denoiser was trained with: how to noise, what to predict, how to read x0_hat.

One object per process, chosen from the pipeline's scheduler config, so the training loop and the loss
terms never branch on it. Today: the DDPM family (epsilon, v-prediction, sample), the process of DiT
and Stable Diffusion 1.x/2.x. A flow-matching process (SD3) is one more class with the same methods.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from .errors import ConfigError
from .losses import diffusion_target, predicted_original_sample

UNSUPPORTED_SCHEDULERS = ("FlowMatch", "EDM", "CMStochastic")  # scheduler class-name prefixes


class DDPMProcess:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps over the pipeline's own discrete schedule."""

    def __init__(self, scheduler_config, device: torch.device | str) -> None:
        name = dict(scheduler_config).get("_class_name", "")
        if name.startswith(UNSUPPORTED_SCHEDULERS):
            # Their noise process is not the DDPM one: training it as DDPM would silently learn the wrong target.
            raise ConfigError("pretrained_model_name_or_path", f"the pipeline's {name} uses a noise process this "
                              "toolkit does not train yet (flow matching or EDM)", "fine-tune a DDPM-family pipeline "
                              "(DiT, Stable Diffusion 1.x/2.x, SDXL)")
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.scheduler.config.prediction_type
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.betas = self.scheduler.betas

    def sample_timesteps(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
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
        """ab_t / (1 - ab_t), diffusers' `compute_snr`."""
        return compute_snr(self.scheduler, timesteps)
