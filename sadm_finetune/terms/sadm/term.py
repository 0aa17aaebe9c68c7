"""SADM as a loss term: the structure discriminator, its optimizer and its phase; the formula itself
lives in `objective.SADMObjective`, the relations in `relations.py`, the options in `config.SADMConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel

from ...config.run import RunConfig
from ...train.optimizers import make_optimizer
from ...utils.errors import InputError
from .config import DISCRIMINATOR_FOLDER
from .discriminator import StructureDiscriminator
from .feature_space import FeatureSpace
from .objective import SADMObjective
from ..base import StepContext, Term, Update, UpdateResult


def build_discriminator(config: RunConfig, adapter) -> StructureDiscriminator:
    s = config.sadm
    if s.disc_resume_from:
        path = Path(s.disc_resume_from)
        if not (path / "config.json").is_file():
            raise InputError(f"disc_resume_from: {path} has no config.json; pass a structure_discriminator folder")
        return StructureDiscriminator.from_pretrained(path, use_safetensors=True)
    num_classes = getattr(adapter, "num_classes", 0) if s.disc_class_conditional else 0
    in_channels = FeatureSpace.channels(s.disc_encoder) if s.disc_space == "features" else adapter.latent_channels
    return StructureDiscriminator(
        in_channels=in_channels, base_channels=s.disc_width, num_blocks=s.disc_depth,
        embed_dim=s.disc_embed_dim, num_classes=num_classes, spectral_norm=s.disc_spectral_norm,
        score_head=s.adversarial_loss != "relations",
    )


class SADMTerm(Term):
    """lambda(step) * L_S for the denoiser; D's update (maximising L_S) as this term's phase."""

    name = "sadm"
    weight_key = "structure_weight"

    def __init__(self, config: RunConfig, adapter, process, adam_epsilon: float) -> None:
        from diffusers.optimization import get_scheduler

        s = self.config = config.sadm
        self.adapter = adapter
        self.objective = SADMObjective(s, process)
        self.process = process
        self.disc = build_discriminator(config, adapter)
        if s.disc_space == "features":
            self.objective.space = FeatureSpace.from_pretrained(adapter.vae, s.disc_encoder, s.disc_encoder_resolution)
        if s.adversarial_loss != "relations" and self.disc.score is None:
            raise InputError(f"disc_resume_from: {s.disc_resume_from} has no score head, which --adversarial_loss "
                             f"{s.adversarial_loss} needs; start D afresh (drop --disc_resume_from)")
        self.optimizer = make_optimizer(config.training.disc_optimizer, self.disc.parameters(), s.disc_learning_rate,
                                        (s.disc_adam_beta1, s.disc_adam_beta2), s.disc_weight_decay, adam_epsilon,
                                        config.training, "disc_optimizer")
        self.scheduler = get_scheduler("constant", self.optimizer)

    def modules(self) -> dict[str, tuple[Any, Any, Any]]:
        return {"discriminator": (self.disc, self.optimizer, self.scheduler)}

    def bind(self, prepared, joint) -> None:
        self.disc, self.optimizer, self.scheduler = prepared["discriminator"]

    @property
    def unwrapped_disc(self) -> StructureDiscriminator:
        return extract_model_from_parallel(self.disc)

    def checkpoint_name(self, module: str, suffix: str) -> str:
        # The discriminator's files keep their historical names (disc_optimizer, disc_scheduler).
        return f"disc{suffix}" if suffix else module

    def export_modules(self) -> dict[str, Any]:
        return {DISCRIMINATOR_FOLDER: self.unwrapped_disc}

    def summary_lines(self, denoiser) -> list[str]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        disc = self.unwrapped_disc
        ratio = count(disc) / max(1, count(denoiser))
        # Information, not a warning: the default D is a few % of a tiny model and far below 1% of a real one.
        hint = "; --disc_width / --disc_depth set its size" if ratio > 0.1 else ""
        return [f"SADM: lambda {self.config.structure_weight}, discriminator {count(disc) / 1e6:.3f} M parameters "
                f"({100 * ratio:.1f}% of the denoiser{hint})"]

    def _class_labels(self, ctx: StepContext) -> torch.Tensor | None:
        return self.adapter.disc_class_labels(ctx.conditioning) if self.config.disc_class_conditional else None

    def weight(self, step: int) -> float:
        return self.objective.structure_weight(step)

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # D and L_S compute in fp32. D enters frozen (detached parameters), so the gradient reaches the
        # denoiser through x0_hat only.
        latents, x0_hat = ctx.structure_inputs()  # masked where the batch has loss masks
        value, logs = self.objective.generator_loss(self.unwrapped_disc, latents, x0_hat, ctx.timesteps,
                                                    self._class_labels(ctx), ctx.generator)
        if self.config.adaptive_weight:
            factor = self.adaptive_factor(ctx, value)
            logs["structure_adaptive_factor"] = factor
            value = value * factor
        if self.config.structure_grad_bands:
            logs.update(self.gradient_bands(ctx, value))
        return value, logs

    def per_sample_loss(self, ctx: StepContext, value: torch.Tensor) -> torch.Tensor:
        """L_S relates pairs, so it has no per-sample value; the gradient diagnostic gets a surrogate
        l_i = B <x0_hat_i, dL_S/dx0_hat_i> (the derivative detached): restricted to a set of samples its gradient is
        L_S's with those samples' x0_hat kept and the others' detached, the push that lands on them. (x0_hat is L_S's
        only path to the denoiser: D enters frozen.) One extra backward through D; nothing is recomputed."""
        x0_hat = ctx.x0_hat
        (g,) = (torch.autograd.grad(value, x0_hat, retain_graph=True, allow_unused=True) if value.requires_grad
                else (None,))
        if g is None:  # L_S does not reach x0_hat (a batch without pairs): no push
            g = torch.zeros_like(x0_hat)
        return x0_hat.shape[0] * (x0_hat * g.detach()).flatten(1).sum(dim=1)

    def adaptive_factor(self, ctx: StepContext, value: torch.Tensor) -> torch.Tensor:
        """||dL_diff/d out|| / (||dL_S/d out|| + 1e-8), clamped to [0, adaptive_weight_max] and detached (VQGAN's
        rule at the denoiser's output)."""
        if ctx.loss_diffusion is None:
            raise RuntimeError("adaptive_weight needs the step's denoising loss in the StepContext")
        (g_s,) = torch.autograd.grad(value, ctx.model_pred, retain_graph=True)
        (g_d,) = torch.autograd.grad(ctx.loss_diffusion, ctx.model_pred, retain_graph=True)
        factor = g_d.norm() / (g_s.norm() + 1e-8)
        return factor.clamp(0.0, self.config.adaptive_weight_max).detach()

    def gradient_bands(self, ctx: StepContext, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per noise band (equal timestep ranges, band 0 the cleanest): the mean per-sample norm of
        d(lambda L_S)/d(model output) (`grad_sadm_band{k}`) and of the unweighted denoising MSE's
        (`grad_mse_band{k}`, 2 (pred - target) / numel), and the first's share of their sum. NaN where a band
        holds no sample of this batch; the tracker averages over steps."""
        lam = self.weight(ctx.step)
        (g_s,) = torch.autograd.grad(value, ctx.model_pred, retain_graph=True)
        target = self.process.target(ctx.latents, ctx.noise, ctx.timesteps)
        g_d = 2.0 * (ctx.model_pred.detach() - target.float()) / ctx.model_pred.numel()
        norm_s = lam * g_s.flatten(1).norm(dim=1)
        norm_d = g_d.flatten(1).norm(dim=1)
        bands = self.config.structure_grad_bands
        band = (ctx.timesteps.float() * bands / self.process.num_train_timesteps).long().clamp(0, bands - 1)
        logs = {}
        for k in range(bands):
            m = (band == k).float()
            n = m.sum()
            s_k = (norm_s * m).sum() / n  # NaN for an empty band
            d_k = (norm_d * m).sum() / n
            logs[f"grad_sadm_band{k}"] = s_k.detach()
            logs[f"grad_mse_band{k}"] = d_k.detach()
            logs[f"grad_share_sadm_band{k}"] = (s_k / (s_k + d_k)).detach()
        return logs

    def phase(self, ctx: StepContext, update: Update) -> tuple[dict[str, torch.Tensor], UpdateResult | None]:
        """`disc_steps` updates of D on this batch (x0_hat detached) on D's turn; stops at a non-finite one."""
        logs: dict[str, torch.Tensor] = {}
        result = None
        if self.config.disc_frozen or not self.objective.is_disc_turn(ctx.step):
            return logs, result
        latents, x0_hat = ctx.structure_inputs()
        for _ in range(self.config.disc_steps):
            loss_d, d_logs = self.objective.discriminator_loss(self.disc, latents, x0_hat.detach(),
                                                               ctx.timesteps, self._class_labels(ctx), ctx.generator)
            result = update(self.optimizer, self.scheduler, loss_d, list(self.disc.parameters()),
                            self.config.disc_max_grad_norm)
            logs.update(d_logs, grad_norm_d=result.grad_norm)
            if not result.applied:
                break
        return logs, result


class StructureProbe(Term):
    """No loss: the real/fake structure gap a fixed encoder sees (sadm.fixed_structure_gap), logged every
    step with SADM on or off, so a plain run shows its baseline."""

    name = "structure_probe"
    weight_key = None

    def __init__(self, objective: SADMObjective) -> None:
        self.objective = objective

    def weight(self, step: int) -> float:
        return 0.0

    def log(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if ctx.latents.shape[0] < 2:  # a batch of one has no pairs: nothing to measure (--structure_weight 0 runs it)
            return {}
        return self.objective.diagnostics(*ctx.structure_inputs(), ctx.timesteps)
