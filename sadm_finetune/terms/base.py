"""The loss-term contract: what the training loop needs from SADM, REPA, SD-DiT and the like.

The loop computes `L = L_diff + sum_k lambda_k(step) * L_k` for the denoiser, backpropagates once,
updates, then gives each term its own phase (a discriminator update, a teacher's EMA). A term owns:

- `modules()`: modules it trains with its own optimizer (a discriminator). The loop prepares them with
  accelerate, checkpoints and resumes them like the denoiser; never exported.
- `joint_modules()`: modules trained by the denoiser's optimizer in the denoiser's update (REPA's
  projector): prepared, checkpointed and resumed with it; never exported.
- `state()`: extra checkpointed state (EMA teachers, running centres), objects with
  `state_dict()` / `load_state_dict()`, saved as safetensors/JSON.
- `feature_blocks`: denoiser blocks whose hidden states it reads (the adapter hooks them).
- `weight(step)`, `loss(ctx)` and `phase(ctx, update)`; `per_sample_loss(ctx, value)` for the per-band
  gradient diagnostic (a per-sample loss needs nothing more).
- `summary_lines(denoiser)`: its lines of the run summary; `export_modules()`: modules saved beside the exported
  pipeline (SADM's discriminator), each in its own folder; `checkpoint_name(module, suffix)`: the file names of
  its modules' state in checkpoints written outside accelerate's lists (FSDP).

Terms are built before `accelerator.prepare` by their config section (terms/registry.py: `TermConfig.build`,
which also checks the config and gives the card's lines) and receive the prepared modules back through `bind`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class StepContext:
    """Everything one micro-batch's forward produced, for the terms to read. x0_hat carries the graph."""

    step: int  # the update this micro-batch belongs to (0-based)
    batch: dict[str, Any]
    latents: torch.Tensor  # z0, (B, C, h, w) fp32
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy_latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    model_pred: torch.Tensor  # fp32, without learned-variance channels
    x0_hat: torch.Tensor  # differentiable in the denoiser's output
    generator: torch.Generator  # seeded by (seed, rank, epoch, batch): reproducible on resume
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # block index -> hidden states, with graph
    class_labels: torch.Tensor | None = None  # the samples' class ids (not dropped), None if unlabelled
    loss_diffusion: torch.Tensor | None = None  # the batch's denoising loss (scalar, with graph)
    loss_mask: torch.Tensor | None = None  # (B, 1, h, w) latent loss mask of masked training, None without masks

    def structure_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(z0, x0_hat) as the structure terms compare them: both multiplied by the loss mask when the batch has one,
        so that D sees, and L_S relates, the masked region only (docs/design.md §10); x0_hat keeps its graph."""
        if self.loss_mask is None:
            return self.latents, self.x0_hat
        mask = self.loss_mask.to(self.latents.dtype)
        return self.latents * mask, self.x0_hat * mask.to(self.x0_hat.dtype)


@dataclass
class UpdateResult:
    applied: bool  # the optimizer stepped (False: a non-finite loss or gradient, or an fp16 overflow skip)
    hard_failure: bool  # counts toward max_nonfinite_steps
    grad_norm: torch.Tensor  # before clipping


# update(optimizer, scheduler, loss, params, max_grad_norm): backward, clip and a non-finite-safe step,
# exactly as the loop does it for the denoiser (loop.apply_update).
Update = Callable[[Any, Any, torch.Tensor, list, "float | None"], UpdateResult]


class Term:
    """A weighted auxiliary loss on the denoiser, with optional modules and phase of its own."""

    name: str = "term"  # prefix of its checkpointed names: "<name>.<joint module>", "<name>_<state>"
    section: str = ""  # the config section (registered name) that built it (terms.build_terms sets it)
    weight_key: str | None = None  # the tracker tag of weight(step); None: not logged
    feature_blocks: tuple[int, ...] = ()

    def modules(self) -> dict[str, tuple[nn.Module, Any, Any]]:
        """name -> (module, optimizer, lr scheduler) trained in `phase`."""
        return {}

    def joint_modules(self) -> dict[str, nn.Module]:
        return {}

    def bind(self, prepared: dict[str, tuple[nn.Module, Any, Any]], joint: dict[str, nn.Module]) -> None:
        """Receive the prepared (possibly DDP-wrapped) modules back, same names as declared."""

    def state(self) -> dict[str, Any]:
        return {}

    def checkpoint_name(self, module: str, suffix: str) -> str:
        """The checkpoint name of `modules()[module]`'s module (suffix "") or its "_optimizer" / "_scheduler" where
        the project writes them itself (under FSDP); [a-z0-9_]."""
        return f"{module}{suffix}"

    def export_modules(self) -> dict[str, nn.Module]:
        """Folder name -> unwrapped module saved beside the exported pipeline (never a pipeline component)."""
        return {}

    def summary_lines(self, denoiser: nn.Module) -> list[str]:
        """This term's lines of the run summary (`denoiser`: the prepared denoiser, for size ratios)."""
        return []

    def weight(self, step: int) -> float:
        raise NotImplementedError

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This term's loss for the batch (a scalar, or per-sample (B,) which the loop averages) and its
        detached logs. Called only while weight(step) > 0."""
        raise NotImplementedError

    def per_sample_loss(self, ctx: StepContext, value: torch.Tensor) -> torch.Tensor | None:
        """For the gradient diagnostic (--grad_bands, train/diagnostics.py): (B,) per-sample losses with the graph,
        given `value` as `loss(ctx)` returned it, such that the gradient of `sum_{i in S} l_i / B` is this term's push
        on the samples in S (summed over all samples: the gradient of the loss the loop adds). By default the loss
        itself when it is per-sample; a term coupling samples (SADM's pairs) overrides this with a surrogate of the
        same gradient. None: not measurable (the diagnostic says so once and leaves the term out)."""
        if value.dim() == 1 and value.shape[0] == ctx.latents.shape[0]:
            return value
        return None

    def log(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Diagnostics logged every step whatever the weight (no gradient)."""
        return {}

    @property
    def nonfinite_key(self) -> str:
        """The tracker tag counting this term's skipped updates, named after its modules
        (SADM: nonfinite_discriminator_updates); the denoiser's own are nonfinite_updates."""
        return f"nonfinite_{'_'.join(self.modules()) or self.name}_updates"

    def phase(self, ctx: StepContext, update: Update) -> tuple[dict[str, torch.Tensor], UpdateResult | None]:
        """After an applied denoiser update: the term's own updates through `update`. Returns its logs and
        the result of its last update (None if it made none). A skipped update (`applied` False) is counted as
        this term's (`nonfinite_key`), not as a skipped denoiser update; a hard failure counts toward
        max_nonfinite_steps."""
        return {}, None
