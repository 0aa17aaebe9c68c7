"""The training loop, top to bottom: one micro-batch's forward, `L_diff + sum_k lambda_k L_k`, the
denoiser's update, EMA, each term's own phase (SADM's discriminator), logs, checkpoints, the stop.

docs/design.md §2: a single `accelerator.accumulate` per micro-batch; term modules enter the denoiser's
loss frozen (their parameters detached, so DDP's reducer never sees them); every optimizer is zeroed after
its update; non-finite updates are skipped on every rank alike (the grad norm is computed after the
all-reduce, so every rank sees the same value). Validation and EMA swapping live in validation.py.
"""

from __future__ import annotations

import functools
import hashlib
import math
import signal
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel
from tqdm.auto import tqdm

from .checkpointing import TrainState
from .diagnostics import DIFFUSION, GradBands
from ..config.run import RunConfig
from .distributed import any_rank
from ..diffusion.latents import clean_latents, latent_loss_mask
from ..diffusion.losses import LearnedSigmaVLB, weighted_mean
from ..diffusion.process import DDPMProcess, FlowMatchProcess, TimestepLoss
from ..terms import StepContext, Term, UpdateResult


@dataclass
class Run:
    """The prepared objects of one training run (builders.build_run makes them)."""

    config: RunConfig
    accelerator: Accelerator
    adapter: Any  # models.family.FamilyAdapter
    process: DDPMProcess | FlowMatchProcess  # noise.make_process: one interface, no branching here
    denoiser: torch.nn.Module  # prepared (DDP/FSDP-wrapped where launched so)
    optimizer: torch.optim.Optimizer  # the denoiser's and the terms' joint modules'
    lr_scheduler: Any
    diffusion_loss: TimestepLoss  # (pred, target, timesteps) -> (B,), the process's own weighting
    vlb: LearnedSigmaVLB | None
    terms: list[Term] = field(default_factory=list)
    joint_modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # prepared
    ema: Any = None  # diffusers.training_utils.EMAModel over `ema_parameters()`
    weight_dtype: torch.dtype = torch.float32

    @property
    def unwrapped_denoiser(self) -> torch.nn.Module:
        return extract_model_from_parallel(self.denoiser)

    def ema_parameters(self) -> list[torch.nn.Parameter]:
        """What the EMA averages: the denoiser's trainable weights (all, LoRA or DiffFit), in a fixed order."""
        return [p for p in self.unwrapped_denoiser.parameters() if p.requires_grad]

    @functools.cached_property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the denoiser's optimizer steps (and its grad norm covers): the denoiser's and joint modules'."""
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        return params + [p for m in self.joint_modules.values() for p in m.parameters() if p.requires_grad]

    def models(self) -> list[torch.nn.Module]:
        """Every prepared module a micro-batch backpropagates into (for `accelerator.accumulate`)."""
        own = [module for term in self.terms for module, _, _ in term.modules().values()]
        return [self.denoiser, *self.joint_modules.values(), *own]

    def feature_blocks(self) -> tuple[int, ...]:
        return tuple(sorted({i for term in self.terms for i in term.feature_blocks}))


def _stable_seed(*parts: int) -> int:
    digest = hashlib.sha256("-".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def grad_norm(accelerator: Accelerator, params: list, max_norm: float | None) -> torch.Tensor:
    norm = accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
    if norm is None:  # DeepSpeed clips inside its engine and returns nothing here
        return torch.tensor(0.0, device=accelerator.device)
    return norm.detach() if torch.is_tensor(norm) else torch.tensor(float(norm), device=accelerator.device)


def apply_update(accelerator: Accelerator, optimizer, scheduler, loss: torch.Tensor, params: list,
                 max_norm: float | None) -> UpdateResult:
    """Clip, then step unless the loss or gradient is non-finite; zero the gradients either way.

    Under fp16 the GradScaler owns that decision: it skips a step with inf/NaN gradients and lowers its
    scale, which must happen for training to recover, so the step is always offered to it. Such overflow
    skips are normal early in fp16 training, and only a non-finite loss counts as a hard failure."""
    norm = grad_norm(accelerator, params, max_norm)
    loss_finite = bool(torch.isfinite(loss.detach()))
    if accelerator.scaler is not None:
        optimizer.step()
        applied, hard_failure = not optimizer.step_was_skipped, not loss_finite
    else:
        applied = loss_finite and bool(torch.isfinite(norm))
        if applied:
            optimizer.step()
        hard_failure = not applied
    if applied:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return UpdateResult(applied, hard_failure, norm)


class StopRequest:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_loop(run: Run, dataloader, dataset, state: TrainState,
               on_update: Callable[[TrainState], None]) -> bool:
    """Train until max_train_steps; `on_update(state)` runs after each update (checkpoints, validation,
    the non-finite guard). Returns True if a signal stopped the run (at a step every rank agrees on)."""
    acc, adapter, process, t = run.accelerator, run.adapter, run.process, run.config.training
    device, seed, models = acc.device, t.seed or 0, run.models()

    def update(optimizer, scheduler, loss, params, max_norm) -> UpdateResult:  # a term's own update
        acc.backward(loss)
        return apply_update(acc, optimizer, scheduler, loss, params, max_norm)

    generator = torch.Generator(device=device)
    grad_bands = GradBands.for_run(run)  # --grad_bands: None when off
    progress = tqdm(total=t.max_train_steps, initial=state.global_step, desc="steps",
                    disable=not acc.is_local_main_process)
    with StopRequest() as stop, progress:
        while state.global_step < t.max_train_steps:
            dataloader.set_epoch(state.epoch)
            dataset.set_epoch(state.epoch)
            batches = acc.skip_first_batches(dataloader, state.batches_in_epoch) if state.batches_in_epoch else dataloader
            for batch in batches:
                # Noise, timesteps and dropout depend only on (seed, rank, epoch, batch): a resumed run
                # draws exactly what the uninterrupted run drew, with no RNG state to carry.
                state.batches_in_epoch += 1
                gen = generator.manual_seed(_stable_seed(seed, acc.process_index, state.epoch, state.batches_in_epoch))
                with acc.accumulate(*models):
                    # 1. z0, the conditioning (with guidance dropout), noise and timesteps, x_t
                    latents = clean_latents(adapter.vae, batch, gen)  # (B, C, h, w) fp32
                    loss_mask = latent_loss_mask(batch, latents)  # (B, 1, h, w) with loss masks, else None
                    cond = adapter.conditioning(batch, device, run.weight_dtype, drop=True, generator=gen)
                    noise = torch.randn(latents.shape, generator=gen, device=device)
                    if t.noise_offset:
                        noise = noise + t.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1),
                                                                     generator=gen, device=device)
                    timesteps = process.sample_timesteps(latents.shape[0], gen, device, latents.shape)
                    noisy_latents = process.add_noise(latents, noise, timesteps)

                    # 2. the denoiser's forward; the hidden states the terms read are hooked on the way
                    with acc.autocast(), adapter.capture_hidden(run.unwrapped_denoiser, run.feature_blocks()) as hidden:
                        out = adapter.predict(run.denoiser, noisy_latents, timesteps, cond)
                    model_pred = out.model_pred.float()
                    ctx = StepContext(state.global_step, batch, latents, noise, timesteps, noisy_latents, cond,
                                      model_pred, process.x0_hat(model_pred, noisy_latents, timesteps), gen, hidden,
                                      loss_mask=loss_mask)

                    # 3. L = L_diff (+ DiT's variational bound) + sum_k lambda_k(step) L_k
                    # per-sample weights: prior preservation's instance / class halves (prior.py), else a mean
                    weights = batch.get("loss_weights")
                    target = process.target(latents, noise, timesteps)
                    per_sample = run.diffusion_loss(model_pred, target, timesteps, loss_mask)  # (B,)
                    loss_diffusion = weighted_mean(per_sample, weights)
                    loss = ctx.loss_diffusion = loss_diffusion
                    logs: dict[str, Any] = {"loss_diffusion": loss_diffusion.detach()}
                    per_sample_vlb = None
                    if run.vlb is not None:
                        per_sample_vlb = run.vlb(model_pred, out.variance, latents, noisy_latents, timesteps, loss_mask)
                        loss_vlb = weighted_mean(per_sample_vlb, weights)
                        loss = loss + loss_vlb
                        logs["loss_vlb"] = loss_vlb.detach()
                    bands = grad_bands is not None and grad_bands.due(state.global_step, acc.sync_gradients,
                                                                      acc.is_main_process)
                    if bands:  # the denoising loss per sample, as loss_diffusion (+ loss_vlb) weighs it
                        denoising = per_sample if per_sample_vlb is None else per_sample + per_sample_vlb
                        grad_bands.add(DIFFUSION, 1.0,
                                       denoising if weights is None else denoising * weights.to(denoising))
                    for term in run.terms:
                        logs.update(term.log(ctx))
                        lam = term.weight(state.global_step)
                        if term.weight_key:
                            logs[term.weight_key] = lam
                        value = None
                        if lam > 0:
                            value, term_logs = term.loss(ctx)
                            loss = loss + lam * value.mean()
                            logs.update(term_logs)
                        if bands:
                            grad_bands.add_term(term, ctx, lam, value)
                    if bands:  # on the step's graph (retained), before its backward; .grad untouched
                        logs.update(grad_bands.measure(timesteps))
                    acc.backward(loss)
                    if not acc.sync_gradients:
                        continue  # mid-accumulation

                    # 4. the denoiser's update and EMA, then each term's own phase (only after an applied update).
                    # A term's skipped update (SADM's D) is the term's: counted under its own key, never as a
                    # skipped denoiser update, and the later terms still run their phases.
                    result = apply_update(acc, run.optimizer, run.lr_scheduler, loss, run.trainable_parameters,
                                          t.max_grad_norm)
                    logs["grad_norm_g"] = result.grad_norm
                    applied, hard_failure = result.applied, result.hard_failure
                    if applied and run.ema is not None:
                        run.ema.step(run.ema_parameters())
                    skipped_terms = []
                    for term in run.terms if applied else ():
                        term_logs, phase = term.phase(ctx, update)
                        logs.update(term_logs)
                        if phase is not None and not phase.applied:  # the term's own update was skipped
                            skipped_terms.append(term.nonfinite_key)
                            hard_failure = hard_failure or phase.hard_failure

                # 5. counters, logs (one device-to-host copy for all tensors), checkpoints, the stop.
                # max_nonfinite_steps counts steps in a row with a hard failure of any update, the denoiser's or
                # a term's: a D whose every update is skipped stays frozen, which the run must not hide.
                state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if hard_failure else 0
                state.nonfinite_total += 0 if applied else 1
                for key in skipped_terms:
                    state.term_nonfinite[key] = state.term_nonfinite.get(key, 0) + 1
                state.global_step += 1
                tensors = {k: v for k, v in logs.items() if torch.is_tensor(v)}
                values = torch.stack([v.detach().float().to(device) for v in tensors.values()]).tolist()
                logs.update(zip(tensors, values), lr=run.lr_scheduler.get_last_lr()[0],
                            nonfinite_updates=float(state.nonfinite_total))
                logs.update({term.nonfinite_key: float(state.term_nonfinite.get(term.nonfinite_key, 0))
                             for term in run.terms if term.modules()})
                progress.update(1)
                progress.set_postfix(loss=f"{logs['loss_diffusion']:.4f}")
                acc.log(logs, step=state.global_step)
                on_update(state)
                # The stop decision is collective: a signal that reached one rank stops all of them here.
                if any_rank(stop.requested, device):
                    return True
                if state.global_step >= t.max_train_steps:
                    break
            else:  # the epoch ran out
                state.epoch += 1
                state.batches_in_epoch = 0
    return False
