"""The SADM min-max game: one object owns the denoiser's and the discriminator's structure terms
(the pattern of StyleGAN2-ADA's `Loss`), each phase separate, diagnostics returned, no backward here.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.func import functional_call

from .config import SADMConfig
from .distributed import gather_with_grad, world_size
from .losses import StructureLoss, structure_sample_weights


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class SADMObjective:
    def __init__(self, config: SADMConfig, alphas_cumprod: torch.Tensor) -> None:
        self.config = config
        self.alphas_cumprod = alphas_cumprod
        self.structure = StructureLoss(config.relation, config.distance, config.kl_temperature)

    # -- schedule ---------------------------------------------------------------------------------
    def structure_weight(self, step: int) -> float:
        """lambda(step): 0 during the discriminator warm-up, then a linear ramp to structure_weight."""
        c = self.config
        ramp_step = step - c.disc_warmup_steps
        if ramp_step < 0:
            return 0.0
        if c.structure_warmup_steps == 0:
            return c.structure_weight
        return c.structure_weight * min(1.0, (ramp_step + 1) / c.structure_warmup_steps)

    def is_disc_turn(self, step: int) -> bool:
        return step % self.config.disc_every == 0

    @property
    def backward_scale(self) -> float:
        """Each rank backpropagates the global L_S into its own samples and DDP averages the
        gradients over ranks; multiplying by the world size restores the gradient of L_S itself."""
        return float(world_size()) if self.config.structure_gather else 1.0

    # -- pieces -----------------------------------------------------------------------------------
    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return gather_with_grad(tensor) if self.config.structure_gather else tensor

    def _loss(self, emb_real: torch.Tensor, emb_fake: torch.Tensor, timesteps: torch.Tensor):
        weights = structure_sample_weights(
            self._gather(timesteps), self.alphas_cumprod, self.config.timestep_weighting,
            self.config.structure_snr_gamma, self.config.structure_t_cutoff,
        )
        return self.structure(self._gather(emb_real), self._gather(emb_fake), weights)

    @staticmethod
    def _embed(disc_call, latents, x0_hat, timesteps, class_labels):
        # One forward over [real; fake]: half the kernel launches of two calls.
        both = torch.cat([latents, x0_hat.to(latents.dtype)], dim=0)
        t = torch.cat([timesteps, timesteps], dim=0)
        y = None if class_labels is None else torch.cat([class_labels, class_labels], dim=0)
        emb = disc_call(both, t, y)
        return emb.chunk(2, dim=0)

    # -- the two players --------------------------------------------------------------------------
    def generator_loss(
        self, disc: nn.Module, latents: torch.Tensor, x0_hat: torch.Tensor, timesteps: torch.Tensor,
        class_labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_S seen by the denoiser, times `backward_scale` (the logs hold L_S itself).

        D is frozen: its parameters enter detached (no gradient reaches them and DDP's reducer is
        not involved), in eval mode (no power-iteration update), so the gradient flows into the
        denoiser through x0_hat only."""
        params = {name: p.detach() for name, p in disc.named_parameters()}

        def call(z, t, y):
            return functional_call(disc, params, (z, t), {"class_labels": y})

        with _eval_mode(disc):
            emb_real, emb_fake = self._embed(call, latents.detach(), x0_hat, timesteps, class_labels)
        loss, logs = self._loss(emb_real.detach(), emb_fake, timesteps)
        return loss * self.backward_scale, {"structure_loss_g": loss.detach(), **logs}

    def discriminator_loss(
        self, disc: nn.Module, latents: torch.Tensor, x0_hat: torch.Tensor, timesteps: torch.Tensor,
        class_labels: torch.Tensor | None, generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_D = -L_S(D(z0), D(x0_hat.detach())) (+ gradient penalty). `disc` may be DDP-wrapped."""
        latents = latents.detach()
        penalty_weight = self.config.disc_gradient_penalty
        if penalty_weight > 0:
            latents = latents.requires_grad_(True)
        emb_real, emb_fake = self._embed(
            lambda z, t, y: disc(z, t, class_labels=y), latents, x0_hat.detach(), timesteps, class_labels
        )
        structure, logs = self._loss(emb_real, emb_fake, timesteps)
        loss = -structure * self.backward_scale
        logs = {"structure_loss_d": structure.detach(), **{f"d_{k}": v for k, v in logs.items()}}
        if penalty_weight > 0:
            # R1-style penalty on real latents: |J^T v|^2 for a random unit v, an unbiased estimate
            # (up to scale) of the squared Frobenius norm of D's Jacobian.
            v = torch.randn(emb_real.shape, device=emb_real.device, generator=generator)
            v = v / v.norm(dim=1, keepdim=True)
            (grad,) = torch.autograd.grad((emb_real * v).sum(), latents, create_graph=True)
            penalty = grad.float().pow(2).sum(dim=tuple(range(1, grad.ndim))).mean()
            loss = loss + penalty_weight * penalty
            logs["disc_gradient_penalty"] = penalty.detach()
        return loss, logs
