"""One micro-batch of SADM training: the denoiser (G) update, then the discriminator (D) update.

docs/design.md §2: a single `accelerator.accumulate` per micro-batch; D is frozen during the G step by
passing its parameters detached (no requires_grad toggling under DDP); both optimizers are zeroed
after their update; non-finite updates are skipped on every rank alike (the grad norm is computed
after the all-reduce, so every rank sees the same value).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from .checkpointing import TrainState
from .config import RunConfig
from .latents import encode, sample_latents
from .losses import DiffusionLoss, LearnedSigmaVLB, diffusion_target, predicted_original_sample
from .sadm import SADMObjective


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    """The dtype of frozen modules under accelerate's mixed precision (trainable weights stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def _stable_seed(*parts: int) -> int:
    digest = hashlib.sha256("-".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class StepRunner:
    def __init__(self, config: RunConfig, adapter, accelerator: Accelerator, denoiser, optimizer_g, scheduler_g,
                 disc, optimizer_d, scheduler_d, ema) -> None:
        self.config = config
        self.adapter = adapter
        self.accelerator = accelerator
        self.denoiser, self.optimizer_g, self.scheduler_g = denoiser, optimizer_g, scheduler_g
        self.disc, self.optimizer_d, self.scheduler_d = disc, optimizer_d, scheduler_d
        self.ema = ema
        self.device = accelerator.device
        self.weight_dtype = weight_dtype_of(accelerator)
        # Training noise follows the pipeline's own schedule and prediction type.
        self.noise_scheduler = DDPMScheduler.from_config(adapter.pipeline.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.diffusion_loss = DiffusionLoss(self.prediction_type, config.training.snr_gamma)
        use_vlb = getattr(adapter, "learned_sigma", False) and config.model.learned_sigma_loss == "vlb"
        self.vlb = LearnedSigmaVLB(self.noise_scheduler.betas, device=self.device) if use_vlb else None
        self.objective = SADMObjective(config.sadm, self.alphas_cumprod, autocast=accelerator.autocast)
        self.sadm_on = disc is not None
        self.generator = torch.Generator(device=self.device)
        self.params_g = [p for p in denoiser.parameters() if p.requires_grad]
        self.models = [m for m in (denoiser, disc) if m is not None]
        self._pending: dict[str, torch.Tensor] = {}

    @property
    def unwrapped_denoiser(self):
        return self.accelerator.unwrap_model(self.denoiser)

    def ema_parameters(self) -> list[torch.nn.Parameter]:
        """What the EMA averages: the trainable weights (all of them, or the LoRA ones), in a fixed order."""
        return [p for p in self.unwrapped_denoiser.parameters() if p.requires_grad]

    @property
    def unwrapped_disc(self):
        return None if self.disc is None else self.accelerator.unwrap_model(self.disc)

    def _reseed(self, state: TrainState) -> torch.Generator:
        # Noise, timesteps and dropout depend only on (seed, rank, epoch, batch): a resumed run draws
        # exactly what the uninterrupted run drew, with no RNG state to carry.
        seed = self.config.training.seed or 0
        return self.generator.manual_seed(
            _stable_seed(seed, self.accelerator.process_index, state.epoch, state.batches_in_epoch)
        )

    # ------------------------------------------------------------------------------------------
    def micro_step(self, batch: dict[str, Any], state: TrainState) -> dict[str, float] | None:
        """Forward/backward one micro-batch; at the end of an accumulation window, update and
        return the step's logs (else None)."""
        acc = self.accelerator
        gen = self._reseed(state)
        with acc.accumulate(*self.models):
            if "latent_mean" in batch:  # cached posterior (latent_cache.py): the same draw, without the encoder
                latents = sample_latents(self.adapter.vae, batch["latent_mean"], batch["latent_std"], generator=gen)
            else:
                latents = encode(self.adapter.vae, batch["pixel_values"], generator=gen)  # (B, C, h, w) fp32
            cond = self.adapter.conditioning(batch, self.device, self.weight_dtype, drop=True, generator=gen)
            bsz = latents.shape[0]
            noise = torch.randn(latents.shape, generator=gen, device=self.device)
            if self.config.training.noise_offset:
                noise = noise + self.config.training.noise_offset * torch.randn(
                    (bsz, latents.shape[1], 1, 1), generator=gen, device=self.device)
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), generator=gen,
                                      device=self.device)
            noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)

            with acc.autocast():
                out = self.adapter.predict(self.denoiser, noisy_latents, timesteps, cond)
            model_pred = out.model_pred.float()
            target = diffusion_target(latents, noise, timesteps, self.alphas_cumprod, self.prediction_type)
            loss_diffusion = self.diffusion_loss(model_pred, target, timesteps, self.alphas_cumprod).mean()
            loss_g = loss_diffusion
            logs: dict[str, torch.Tensor] = {"loss_diffusion": loss_diffusion.detach()}
            if self.vlb is not None:
                loss_vlb = self.vlb(model_pred, out.variance, latents, noisy_latents, timesteps).mean()
                loss_g = loss_g + loss_vlb
                logs["loss_vlb"] = loss_vlb.detach()

            lam = 0.0
            class_labels = self.adapter.disc_class_labels(cond) if self.config.sadm.disc_class_conditional else None
            x0_hat = predicted_original_sample(model_pred, noisy_latents, timesteps, self.alphas_cumprod,
                                               self.prediction_type)
            if self.config.sadm.structure_diagnostics:
                logs.update(self.objective.diagnostics(latents, x0_hat, timesteps))
            if self.sadm_on:
                lam = self.objective.structure_weight(state.global_step)
                if lam > 0:
                    # D's forward runs under autocast inside the objective; L_S itself is fp32.
                    structure, s_logs = self.objective.generator_loss(
                        self.unwrapped_disc, latents, x0_hat, timesteps, class_labels, gen)
                    loss_g = loss_g + lam * structure
                    logs.update(s_logs)
            acc.backward(loss_g)
            if not acc.sync_gradients:
                return None

            grad_norm_g = self._grad_norm(self.params_g, self.config.training.max_grad_norm)
            logs["grad_norm_g"] = grad_norm_g
            applied, hard_failure = self._update(self.optimizer_g, self.scheduler_g, loss_g, grad_norm_g)
            if applied and self.ema is not None:
                self.ema.step(self.ema_parameters())
            self.optimizer_g.zero_grad(set_to_none=True)

            if applied and self.sadm_on and self.objective.is_disc_turn(state.global_step):
                applied, hard_failure = self._disc_update(latents, x0_hat, timesteps, class_labels, gen, logs)

        state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if hard_failure else 0
        state.nonfinite_total += 0 if applied else 1
        # One device-to-host copy for all tensor logs (a per-value float() would sync once each on GPU).
        values = torch.stack([v.detach().float().to(self.device) for v in logs.values()]).tolist()
        result = dict(zip(logs, values))
        result.update(structure_weight=lam, lr=self.scheduler_g.get_last_lr()[0],
                      nonfinite_updates=float(state.nonfinite_total))
        return result

    def _update(self, optimizer, scheduler, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, bool]:
        """Step unless the loss or gradient is non-finite; returns (applied, counts toward max_nonfinite_steps).

        Under fp16 the GradScaler owns that decision: it skips a step with inf/NaN gradients and lowers
        its scale, which must happen for training to recover, so the step is always offered to it.
        Such overflow skips are normal early in fp16 training and only a non-finite loss counts as a failure.
        """
        loss_finite = bool(torch.isfinite(loss.detach()))
        if self.accelerator.scaler is not None:
            optimizer.step()
            applied = not optimizer.step_was_skipped
            hard_failure = not loss_finite
        else:
            applied = loss_finite and bool(torch.isfinite(grad_norm))
            if applied:
                optimizer.step()
            hard_failure = not applied
        if applied:
            scheduler.step()
        return applied, hard_failure

    def _disc_update(self, latents, x0_hat, timesteps, class_labels, gen, logs) -> tuple[bool, bool]:
        """`disc_steps` updates of D on this batch (its x0_hat detached); stops at a non-finite one."""
        acc = self.accelerator
        applied, hard_failure = True, False
        for _ in range(self.config.sadm.disc_steps):
            loss_d, d_logs = self.objective.discriminator_loss(self.disc, latents, x0_hat.detach(), timesteps,
                                                               class_labels, gen)
            acc.backward(loss_d)
            grad_norm_d = self._grad_norm(list(self.disc.parameters()), self.config.sadm.disc_max_grad_norm)
            applied, hard_failure = self._update(self.optimizer_d, self.scheduler_d, loss_d, grad_norm_d)
            self.optimizer_d.zero_grad(set_to_none=True)
            logs.update(d_logs)
            logs["grad_norm_d"] = grad_norm_d
            if not applied:
                break
        return applied, hard_failure

    def _grad_norm(self, params, max_norm: float | None) -> torch.Tensor:
        norm = self.accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
        if norm is None:  # DeepSpeed clips inside its engine and returns nothing here
            return torch.tensor(0.0, device=self.device)
        return norm.detach() if torch.is_tensor(norm) else torch.tensor(float(norm), device=self.device)

    # ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def inference_pipeline(self, model=None) -> Iterator[Any]:
        """The stock pipeline around the current weights (EMA weights when on), in eval mode.
        `model`: under FSDP, a gathered stock copy of the denoiser (distributed.gathered_copy) to use instead."""
        model = self.unwrapped_denoiser if model is None else model
        if self.ema is not None:
            self.ema.store(self.ema_parameters())
            self.ema.copy_to(self.ema_parameters())
        was_training = model.training
        model.eval()
        try:
            pipeline = self.adapter.export_pipeline(model)
            pipeline.set_progress_bar_config(disable=True)
            yield pipeline
        finally:
            model.train(was_training)
            if self.ema is not None:
                self.ema.restore(self.ema_parameters())

    def validate(self, path, step: int, model=None) -> None:
        """Main process only: a fixed grid (fixed labels and seeds), saved and logged to the trackers."""
        from .export import save_grid

        t = self.config.training
        # autocast: under mixed precision the frozen components sit in weight_dtype, the denoiser in fp32.
        with self.inference_pipeline(model) as pipeline, torch.no_grad(), self.accelerator.autocast():
            grid = self.adapter.sample_grid(pipeline, t.num_validation_images, t.validation_inference_steps,
                                            t.validation_guidance_scale, t.seed or 0,
                                            self.adapter.validation_conditions(t))
        save_grid(grid, path)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                rows, cols = grid.shape[:2]
                tracker.writer.add_images("validation", grid.reshape(rows * cols, *grid.shape[2:]), step,
                                          dataformats="NHWC")
        del pipeline
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
