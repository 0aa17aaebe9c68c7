"""The SADM min-max game: one object owns the denoiser's and the discriminator's structure terms
(the pattern of StyleGAN2-ADA's `Loss`), each phase separate, diagnostics returned, no backward here.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .config import SADMConfig
from ...train.distributed import gather_with_grad, world_size
from .relations import PerSampleAdversarialLoss, StructureLoss, structure_weights


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def wiener_lowpass(latents: torch.Tensor, sample_snr: torch.Tensor) -> torch.Tensor:
    """Each sample filtered to the detail a posterior mean keeps at its noise level.

    For a stationary Gaussian prior with power spectrum P(f), observed as z0 + noise of variance 1/SNR
    (x_t / sqrt(ab_t)), the posterior mean is the Wiener filter H(f) = SNR P(f) / (SNR P(f) + 1). P is
    estimated per channel from the batch itself. (B, C, H, W), (B,) -> (B, C, H, W) in latents' dtype.
    """
    z = latents.float()
    spectrum = torch.fft.fft2(z, norm="ortho")  # white noise of variance v has E|F|^2 = v per frequency
    power = spectrum.abs().pow(2).mean(dim=0, keepdim=True)  # (1, C, H, W)
    s = sample_snr.float().reshape(-1, 1, 1, 1)
    gain = s * power / (s * power + 1.0)
    return torch.fft.ifft2(spectrum * gain, norm="ortho").real.to(latents.dtype)


def paired_augment(real: torch.Tensor, fake: torch.Tensor, policy: str,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffAugment (Zhao et al., NeurIPS 2020) for the structure discriminator, paired: sample i's real and fake
    get the same random translation (up to 1/8 of the side each way, zero fill) and cutout (a zeroed square of half
    the side, centred anywhere, clipped at the border), so the two relation matrices still compare like with like.
    Differentiable in both inputs. `policy`: "translation", "cutout" or "translation,cutout"."""
    b, c, h, w = real.shape
    both = torch.stack([real, fake.to(real.dtype)])  # (2, B, C, H, W)
    kw = {"generator": generator, "device": real.device}
    if "translation" in policy:
        sy, sx = max(1, h // 8), max(1, w // 8)
        dy, dx = torch.randint(-sy, sy + 1, (b,), **kw), torch.randint(-sx, sx + 1, (b,), **kw)
        padded = F.pad(both, (sx, sx, sy, sy))  # (2, B, C, H + 2sy, W + 2sx)
        rows = torch.arange(h, device=real.device)[None, :] + sy - dy[:, None]  # out[y] = in[y - dy]
        cols = torch.arange(w, device=real.device)[None, :] + sx - dx[:, None]
        both = padded.gather(3, rows[None, :, None, :, None].expand(2, b, c, h, w + 2 * sx))
        both = both.gather(4, cols[None, :, None, None, :].expand(2, b, c, h, w))
    if "cutout" in policy:
        ch, cw = max(1, h // 2), max(1, w // 2)
        top = torch.randint(0, h, (b,), **kw)[:, None] - ch // 2
        left = torch.randint(0, w, (b,), **kw)[:, None] - cw // 2
        ys, xs = torch.arange(h, device=real.device)[None, :], torch.arange(w, device=real.device)[None, :]
        in_y, in_x = (ys >= top) & (ys < top + ch), (xs >= left) & (xs < left + cw)  # (B, H), (B, W)
        keep = ~(in_y[:, :, None] & in_x[:, None, :])  # (B, H, W)
        both = both * keep[None, :, None].to(both.dtype)
    return both[0], both[1]


def fixed_structure_gap(latents: torch.Tensor, x0_hat: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The real/fake structure gap seen by a fixed encoder that nobody trains: latents average-pooled to
    2x2 and unit-normalised, then the default L_S (cosine relations, MSE, the same pair weights). A
    diagnostic, no gradient."""
    with torch.no_grad():
        def encode(z: torch.Tensor) -> torch.Tensor:
            return F.normalize(F.adaptive_avg_pool2d(z.float(), 2).flatten(1), dim=1)

        gap, _ = StructureLoss("cosine", "mse")(encode(latents), encode(x0_hat), weights)
        return gap


class SADMObjective:
    def __init__(self, config: SADMConfig, process) -> None:
        """`process`: the run's noise process (noise.py), which gives each timestep's SNR and re-noises D's
        inputs. D computes in fp32 whatever autocast surrounds it (models/discriminator.py), and so do the
        relations and L_S.

        `config.adversarial_loss` other than "relations" swaps L_S for a per-sample GAN loss on D's scores
        (the control without structure): same D body, inputs, weights and schedule."""
        self.config = config
        self.process = process
        self.structure = StructureLoss(config.relation, config.distance, config.kl_temperature,
                                       config.pair_weighting)
        # --disc_space features: latents -> a frozen encoder's features of the decoded images (feature_space.py),
        # set by the term that owns the VAE; None: D reads the latents.
        self.space = None
        kind = config.adversarial_loss
        self.per_sample = None if kind == "relations" else PerSampleAdversarialLoss(kind.removeprefix("per_sample_"))

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
        return float(world_size()) if self.config.structure_gather and self.per_sample is None else 1.0

    # -- pieces -----------------------------------------------------------------------------------
    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return gather_with_grad(tensor) if self.config.structure_gather else tensor

    def sample_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        c = self.config
        return structure_weights(self.process.snr, timesteps, c.timestep_weighting, c.structure_snr_gamma,
                                 c.structure_t_cutoff)

    def _loss(self, emb_real: torch.Tensor, emb_fake: torch.Tensor, timesteps: torch.Tensor):
        # fp32 whatever the caller's autocast: relations of unit vectors differ by ~1e-5 late in training,
        # below bf16's resolution.
        with torch.autocast(emb_real.device.type, enabled=False):
            weights = self.sample_weights(self._gather(timesteps))
            return self.structure(self._gather(emb_real).float(), self._gather(emb_fake).float(), weights)

    def disc_inputs(
        self, latents: torch.Tensor, x0_hat: torch.Tensor, timesteps: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What D compares: (real, fake, D's timesteps). The options take the posterior mean's blur away
        from D as a tell: the real side low-passed to the detail x0_hat can carry at t; both sides
        re-noised to a common level s <= t with one shared noise draw (instance noise); both pooled. Last,
        paired DiffAugment (few-shot data)."""
        c = self.config
        real, fake, t_disc = latents, x0_hat.to(latents.dtype), timesteps
        if c.disc_real_lowpass:
            real = wiener_lowpass(real, self.process.snr(timesteps))
        if c.disc_renoise > 0:
            real, fake, t_disc = self.process.renoise(real, fake, timesteps, c.disc_renoise, generator)
        if self.space is not None:
            real, fake = self.space(real), self.space(fake)
        if c.disc_pool > 1:
            real, fake = F.avg_pool2d(real, c.disc_pool), F.avg_pool2d(fake, c.disc_pool)
        if c.disc_augment != "none":
            real, fake = paired_augment(real, fake, c.disc_augment, generator)
        return real, fake, t_disc

    def _embed(self, disc_call, latents, x0_hat, timesteps, class_labels, generator=None):
        real, fake, t = self.disc_inputs(latents, x0_hat, timesteps, generator)
        # One forward over [real; fake]: half the kernel launches of two calls.
        both = torch.cat([real, fake], dim=0)
        t = torch.cat([t, t], dim=0)
        y = None if class_labels is None else torch.cat([class_labels, class_labels], dim=0)
        out = disc_call(both, t, y)  # embeddings (2B, d), or scores (2B,) for the per-sample control
        return out.float().chunk(2, dim=0)

    def diagnostics(self, latents: torch.Tensor, x0_hat: torch.Tensor, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logged every step, with or without the structure term: the gap a fixed encoder sees."""
        weights = self.sample_weights(timesteps)
        return {"structure_gap_fixed": fixed_structure_gap(latents.detach(), x0_hat.detach(), weights)}

    # -- the two players --------------------------------------------------------------------------
    def generator_loss(
        self, disc: nn.Module, latents: torch.Tensor, x0_hat: torch.Tensor, timesteps: torch.Tensor,
        class_labels: torch.Tensor | None, generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_S seen by the denoiser, times `backward_scale` (the logs hold L_S itself).

        D is frozen: its parameters enter detached (no gradient reaches them and DDP's reducer is
        not involved), in eval mode (no power-iteration update), so the gradient flows into the
        denoiser through x0_hat only."""
        params = {name: p.detach() for name, p in disc.named_parameters()}
        scores = self.per_sample is not None

        def call(z, t, y):
            return functional_call(disc, params, (z, t), {"class_labels": y, "return_score": scores})

        with _eval_mode(disc):
            emb_real, emb_fake = self._embed(call, latents.detach(), x0_hat, timesteps, class_labels, generator)
        if scores:
            loss = self.per_sample.generator(emb_fake, self.sample_weights(timesteps))
            logs = {"d_score_real": emb_real.mean().detach(), "d_score_fake": emb_fake.mean().detach()}
            return loss, {"structure_loss_g": loss.detach(), **logs}
        loss, logs = self._loss(emb_real.detach(), emb_fake, timesteps)
        # D's separability: 1 = D maps each x0_hat where it maps its own z0; lower = D tells them apart.
        logs["d_pair_cos"] = (emb_real * emb_fake).sum(dim=1).mean().detach()
        return loss * self.backward_scale, {"structure_loss_g": loss.detach(), **logs}

    def discriminator_loss(
        self, disc: nn.Module, latents: torch.Tensor, x0_hat: torch.Tensor, timesteps: torch.Tensor,
        class_labels: torch.Tensor | None, generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_D = -L_S(D(z0), D(x0_hat.detach())) (+ gradient penalty), or D's per-sample GAN loss for the
        control. `disc` may be DDP-wrapped."""
        latents = latents.detach()
        penalty_weight = self.config.disc_gradient_penalty
        if penalty_weight > 0:
            latents = latents.requires_grad_(True)
        scores = self.per_sample is not None
        emb_real, emb_fake = self._embed(
            lambda z, t, y: disc(z, t, class_labels=y, return_score=scores), latents, x0_hat.detach(), timesteps,
            class_labels, generator,
        )
        if scores:  # D minimises its GAN loss (the per-sample control)
            loss = self.per_sample.discriminator(emb_real, emb_fake, self.sample_weights(timesteps))
            logs = {"structure_loss_d": loss.detach(), "d_score_gap": (emb_real - emb_fake).mean().detach()}
        else:
            structure, logs = self._loss(emb_real, emb_fake, timesteps)
            loss = -structure * self.backward_scale
            logs = {"structure_loss_d": structure.detach(), **{f"d_{k}": v for k, v in logs.items()}}
        if penalty_weight > 0:
            # R1-style penalty on real latents: |J^T v|^2 for a random unit v, an unbiased estimate
            # (up to scale) of the squared Frobenius norm of D's Jacobian.
            # With scores (the per-sample control) it is R1 itself: |grad of s_real|^2.
            if scores:
                v = torch.ones_like(emb_real)
            else:
                v = torch.randn(emb_real.shape, device=emb_real.device, generator=generator)
                v = v / v.norm(dim=1, keepdim=True)
            (grad,) = torch.autograd.grad((emb_real * v).sum(), latents, create_graph=True)
            penalty = grad.float().pow(2).sum(dim=tuple(range(1, grad.ndim))).mean()
            loss = loss + penalty_weight * penalty
            logs["disc_gradient_penalty"] = penalty.detach()
        return loss, logs
