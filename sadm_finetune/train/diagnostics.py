"""Each loss term's share of the denoiser's gradient, per noise band (`--grad_bands K`, `--grad_bands_every N`).

Every N updates, on the main process's local batch (the update's last micro-batch), the timesteps are split into K
equal bands (band k holds t in [kT/K, (k+1)T/K), band 0 the cleanest) and, for every loss term of the step (the
denoising loss as `diffusion`, DiT's variational bound included; each term by its `Term.name`), the diagnostic logs

- `grad_band{k}_{term}`: the L2 norm over the denoiser's trainable parameters of d(lambda_term * sum_{i in band k}
  l_i / B)/d theta, with l_i the term's per-sample loss (`Term.per_sample_loss`) and B the local batch: the part of
  the step's gradient that band k's samples contribute through this term (the bands' parts sum to the term's whole
  gradient). lambda is the weight the loop applies at that step; a term at weight 0 gets 0.
- `grad_share_band{k}_{term}`: that norm over the sum of the band's norms (the terms' shares sum to 1 per band).

NaN for a band that holds none of the batch's samples (the tracker's mean over steps should skip them). Measured
where every term meets (the denoiser's weights; not REPA's projector or SD-DiT's head, which one term alone trains):
SADM's push acts through x0_hat, REPA's through a block's hidden states, SD-DiT's through the encoder's tokens.

It never changes training: `torch.autograd.grad(..., retain_graph=True)` on the step's own graph, with the loss
values the step computed (no term's loss runs twice, no random draw), never touching `.grad`. Costs one backward
through the denoiser per band and term, every N updates.
"""

from __future__ import annotations

import logging
import math

import torch
from accelerate.utils import DistributedType

from ..terms import StepContext, Term
from ..utils.errors import ConfigError

logger = logging.getLogger(__name__)

DIFFUSION = "diffusion"  # the denoising loss's name in the keys


def has_loss(term: Term) -> bool:
    """Whether `term` adds a loss to the denoiser's (the structure probe only logs)."""
    return type(term).loss is not Term.loss


def band_of(timesteps: torch.Tensor, bands: int, num_train_timesteps: int) -> torch.Tensor:
    """(B,) band index of each timestep: K equal ranges of [0, T), band 0 the cleanest (as SADM's
    --structure_grad_bands)."""
    return (timesteps.float() * bands / num_train_timesteps).long().clamp(0, bands - 1)


def gradient_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """||d loss / d params||_2 over all of `params` (0 where the loss does not reach them), fp32, `.grad` untouched."""
    if not loss.requires_grad:
        return torch.zeros((), device=loss.device)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=loss.device)


class GradBands:
    """The per-band, per-term gradient diagnostic of one run; the loop asks `due(step)`, then hands each term's
    per-sample loss to `add` and the step's timesteps to `measure`."""

    def __init__(self, bands: int, every: int, num_train_timesteps: int, params: list[torch.Tensor]) -> None:
        self.bands, self.every, self.num_train_timesteps = bands, every, num_train_timesteps
        self.params = params
        self.parts: list[tuple[str, float, torch.Tensor | None]] = []
        self._reported: set[str] = set()

    @classmethod
    def for_run(cls, run) -> "GradBands | None":
        """The diagnostic of a train.loop.Run, or None when --grad_bands is 0. Refused (one line) where the
        denoiser's weights are sharded (FSDP, DeepSpeed): a rank's gradient norm would be its shard's."""
        t = run.config.training
        if not t.grad_bands:
            return None
        if run.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError("grad_bands", f"measures gradient norms over the whole denoiser, which "
                              f"{run.accelerator.distributed_type.value} shards across ranks",
                              "drop --grad_bands, or measure in a DDP or single-process run")
        params = [p for p in run.denoiser.parameters() if p.requires_grad]
        return cls(t.grad_bands, t.grad_bands_every, run.process.num_train_timesteps, params)

    def due(self, step: int, sync_gradients: bool, is_main_process: bool) -> bool:
        """Measure in this micro-batch? Every `every` updates, the update's last micro-batch, the main process."""
        self.parts = []
        return sync_gradients and is_main_process and step % self.every == 0

    def add(self, name: str, weight: float, per_sample: torch.Tensor | None) -> None:
        """One term's part: its name, the weight the loop applies, its (B,) per-sample loss (None: weight 0)."""
        self.parts.append((name, float(weight), per_sample))

    def add_term(self, term: Term, ctx: StepContext, weight: float, value: torch.Tensor | None) -> None:
        """A term's part from the loss value the loop computed (None: the term was at weight 0 and did not run).
        A term without a per-sample form is reported once and left out."""
        if not has_loss(term):
            return
        per_sample = None
        if value is not None and weight > 0:
            per_sample = term.per_sample_loss(ctx, value)
            if per_sample is None:
                if term.name not in self._reported:
                    self._reported.add(term.name)
                    logger.warning(f"grad_bands: {term.name} is not measurable (its loss is not per-sample and it "
                                   "does not implement Term.per_sample_loss); left out of the shares")
                return
        self.add(term.name, weight, per_sample)

    def measure(self, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logs of this step: grad_band{k}_{name} and grad_share_band{k}_{name} for every part added."""
        band = band_of(timesteps, self.bands, self.num_train_timesteps)
        device = timesteps.device
        nan = torch.tensor(math.nan, device=device)
        logs: dict[str, torch.Tensor] = {}
        for k in range(self.bands):
            members = band == k
            norms = {}
            for name, weight, per_sample in self.parts:
                if not bool(members.any()):
                    norms[name] = nan
                elif per_sample is None or weight == 0:
                    norms[name] = torch.zeros((), device=device)
                else:
                    mask = members.to(per_sample.dtype)
                    norms[name] = gradient_norm(weight * (per_sample * mask).sum() / per_sample.shape[0], self.params)
            total = sum(norms.values()) if norms else nan
            for name, norm in norms.items():
                logs[f"grad_band{k}_{name}"] = norm.detach()
                logs[f"grad_share_band{k}_{name}"] = (norm / total).detach()
        self.parts = []
        return logs
