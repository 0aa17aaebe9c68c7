"""SD-DiT's discriminative term (Zhu et al. 2024, arXiv 2403.17004) on a DiT: the first N blocks are an
encoder; a teacher (the EMA of the student's encoder and projection head) sees x at the minimum noise level,
the student sees x_t, both with the same noise (one probability-flow trajectory); a DINO loss (or cosine)
pulls the student's pooled, projected tokens toward the teacher's. Choices where the paper is silent:
docs/design.md §4 "SD-DiT"."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config.run import RunConfig
from ...utils.errors import ConfigError
from .config import SDDiTConfig
from ..base import StepContext, Term, Update, UpdateResult

DINO_BOTTLENECK_DIM = 256  # DINO's head: MLP -> 256-d L2-normalised bottleneck -> prototypes


class DiTEncoder(nn.Module):
    """The first blocks of a diffusers DiT: patchify + positional embedding, then blocks that each embed the
    timestep and class label themselves (adaLN-zero), exactly as `DiTTransformer2DModel.forward` calls them."""

    def __init__(self, pos_embed: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.pos_embed = pos_embed
        self.blocks = nn.ModuleList(blocks)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor,
                kept_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, h, w) -> (B, tokens, hidden); `kept_tokens` (B, k): indices of the tokens to keep (masking)."""
        hidden = self.pos_embed(latents)  # positions are added here, so kept tokens keep theirs
        if kept_tokens is not None:
            hidden = hidden.gather(1, kept_tokens[..., None].expand(-1, -1, hidden.shape[-1]))
        for block in self.blocks:
            hidden = block(hidden, timestep=timesteps, class_labels=class_labels)
        return hidden


def dit_encoder(denoiser: nn.Module, depth: int) -> DiTEncoder:
    """A view (shared modules, not a copy) of the denoiser's first `depth` blocks."""
    return DiTEncoder(denoiser.pos_embed, list(denoiser.transformer_blocks[:depth]))


class ProjectionHead(nn.Module):
    """DINO's head: a 3-layer GELU MLP to an L2-normalised bottleneck, then a weight-normalised linear layer
    without bias whose row norms are fixed to 1 (DINO's `norm_last_layer`): outputs are cosines to prototypes."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, bottleneck_dim: int = DINO_BOTTLENECK_DIM) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, out_dim)
        z = F.normalize(self.mlp(pooled), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=-1))


class Centre:
    """DINO's running centre of the teacher's outputs (checkpointed); `update` takes the step's summed outputs
    and their count, already all-reduced over ranks."""

    def __init__(self, dim: int, momentum: float) -> None:
        self.momentum = momentum
        self.value = torch.zeros(dim)

    def to(self, device: torch.device) -> "Centre":
        self.value = self.value.to(device)
        return self

    def update(self, total: torch.Tensor, count: torch.Tensor) -> None:
        # c <- m c + (1 - m) mean(teacher outputs)   (DINO, Caron et al. 2021, eq. 4)
        self.value.mul_(self.momentum).add_(total / count, alpha=1 - self.momentum)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"center": self.value}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.value.copy_(state["center"])


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor,
              student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """Per-sample cross-entropy H(P_t, P_s): P_t = softmax((t - c) / tau_t) (centred, sharpened, no gradient),
    P_s = softmax(s / tau_s) (DINO, Caron et al. 2021, eq. 1). fp32, (B,)."""
    teacher_probs = F.softmax((teacher_out.float() - center) / teacher_temperature, dim=-1).detach()
    student_log_probs = F.log_softmax(student_out.float() / student_temperature, dim=-1)
    return -(teacher_probs * student_log_probs).sum(dim=-1)


def cosine_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """1 - cos(student, teacher), fp32, (B,); the teacher carries no gradient."""
    return 1 - F.cosine_similarity(student_out.float(), teacher_out.float().detach(), dim=-1)


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def check_sddit_model(denoiser: nn.Module, config: SDDiTConfig) -> None:
    """ConfigError unless `denoiser` is a DiT-style transformer deeper than the encoder."""
    blocks = getattr(denoiser, "transformer_blocks", None)
    if blocks is None or not hasattr(denoiser, "pos_embed"):
        raise ConfigError("sddit_weight", f"SD-DiT needs a DiT-style transformer, not a {type(denoiser).__name__}",
                          "drop --sddit_weight or fine-tune a DiT pipeline")
    if config.sddit_encoder_depth >= len(blocks):
        raise ConfigError("sddit_encoder_depth", f"is {config.sddit_encoder_depth}, but this DiT has only "
                          f"{len(blocks)} blocks and some must remain after the encoder",
                          f"pass --sddit_encoder_depth 1..{len(blocks) - 1}")


class SDDiTTerm(Term):
    """lambda * L_disc(student(x_t), teacher(x_tmin)); the teacher's EMA and the centre's update as the phase."""

    name = "sddit"
    weight_key = "sddit_weight"

    def __init__(self, config: RunConfig, adapter, process, autocast) -> None:
        s = self.config = config.sddit
        denoiser = adapter.denoiser
        check_sddit_model(denoiser, s)
        steps = getattr(process, "num_train_timesteps", None)
        if steps is not None and s.sddit_t_min >= steps:  # a band no sample is ever drawn in: the term would be off
            raise ConfigError("sddit_t_min", f"is {s.sddit_t_min}, but timesteps run 0..{steps - 1}",
                              f"pass --sddit_t_min below {steps}")
        self.autocast = autocast
        self.add_noise = process.add_noise
        self.student_encoder = dit_encoder(denoiser, s.sddit_encoder_depth)  # the denoiser's own modules
        self.student_head = ProjectionHead(denoiser.inner_dim, s.sddit_head_hidden_dim, s.sddit_head_dim)
        self.head = self.student_head  # the prepared (possibly DDP-wrapped) head after `bind`
        self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(self.student_encoder),
                                      "head": copy.deepcopy(self.student_head)}).float().requires_grad_(False).eval()
        self.center = Centre(s.sddit_head_dim, s.sddit_center_momentum) if s.sddit_loss == "dino" else None
        # The teacher outputs of the current update's micro-batches, for the centre: (step, sum, count).
        self._pending: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.feature_blocks = (s.sddit_encoder_depth - 1,) if s.sddit_mask_ratio == 0 else ()

    def joint_modules(self) -> dict[str, nn.Module]:
        return {"head": self.student_head}

    def bind(self, prepared, joint) -> None:
        self.head = joint["head"]
        device = next(self.student_head.parameters()).device  # prepare put the head where the denoiser is
        self.teacher.to(device)
        if self.center is not None:
            self.center.to(device)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"teacher": self.teacher}
        if self.center is not None:
            state["center"] = self.center
        return state

    def summary_lines(self, denoiser) -> list[str]:
        d = self.config
        size = sum(p.numel() for p in self.student_head.parameters())
        return [f"SD-DiT: lambda {d.sddit_weight}, encoder = the first {d.sddit_encoder_depth} blocks, "
                f"{d.sddit_loss} loss, head {size / 1e6:.3f} M parameters, teacher EMA "
                f"{d.sddit_ema_decay}" + (f", mask ratio {d.sddit_mask_ratio}" if d.sddit_mask_ratio else "")
                + (f", on one update in {d.sddit_every} at lambda x {d.sddit_every}" if d.sddit_every > 1 else "")
                + (f", on timesteps [{d.sddit_t_min}, {d.sddit_t_max if d.sddit_t_max is not None else 'end'})"
                   + (" (the denoiser's push only; the head learns on every timestep)"
                      if d.sddit_band_scope == "encoder" else "")
                   if d.has_band else "")]

    def weight(self, step: int) -> float:
        """lambda on every update, or with ``sddit_every`` N: lambda x N on updates 0, N, 2N, ... and 0 between them
        (lazy regularisation: the same push on average; the loop computes the term only where its weight is > 0)."""
        every = self.config.sddit_every
        return self.config.sddit_weight * every if step % every == 0 else 0.0

    def _student_tokens(self, ctx: StepContext) -> torch.Tensor:
        """Tokens after the student's encoder at t: the main forward's (hooked), or with masking a second pass
        over a random subset of tokens (drawn from the step's generator; the diffusion loss keeps the full path)."""
        s = self.config
        if s.sddit_mask_ratio == 0:
            return ctx.hidden[s.sddit_encoder_depth - 1]
        b, _, h, w = ctx.noisy_latents.shape
        patch = self.student_encoder.pos_embed.patch_size
        num_tokens = (h // patch) * (w // patch)
        num_kept = num_tokens - int(num_tokens * s.sddit_mask_ratio)  # ratio < 1: at least one token stays
        scores = torch.rand((b, num_tokens), generator=ctx.generator, device=ctx.noisy_latents.device)
        kept = scores.argsort(dim=1)[:, :num_kept]
        with self.autocast():
            return self.student_encoder(ctx.noisy_latents, ctx.timesteps, ctx.conditioning["class_labels"], kept)

    @torch.no_grad()
    def _teacher_out(self, ctx: StepContext) -> torch.Tensor:
        """The teacher's projection of x at t_min = 0 with the student's noise: (B, head_dim) fp32."""
        t_min = torch.zeros_like(ctx.timesteps)
        x_tmin = self.add_noise(ctx.latents, ctx.noise, t_min)
        with self.autocast():
            tokens = self.teacher["encoder"](x_tmin, t_min, ctx.conditioning["class_labels"])
        return self.teacher["head"](tokens.float().mean(dim=1))

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.config
        band = self._in_band(ctx.timesteps)
        pooled = self._student_tokens(ctx).float().mean(dim=1)
        if band is not None and s.sddit_band_scope == "encoder":  # the head learns from every sample, the
            pooled = torch.where(band[:, None], pooled, pooled.detach())  # denoiser from the band's samples only
        student_out = self.head(pooled).float()  # (B, head_dim)
        teacher_out = self._teacher_out(ctx)
        if self.center is not None:
            value = dino_loss(student_out, teacher_out, self.center.value, s.sddit_student_temperature,
                              s.sddit_teacher_temperature)
            self._accumulate_for_centre(ctx.step, teacher_out)
        else:
            value = cosine_loss(student_out, teacher_out)
        cos = F.cosine_similarity(student_out.detach(), teacher_out, dim=-1).mean()
        logs = {"loss_sddit": value.detach().mean(), "sddit_student_teacher_cos": cos}
        if band is not None:
            logs["sddit_band_share"] = band.float().mean()
            if s.sddit_band_scope == "loss":  # w(t) = 1 in the band, 0 outside: the batch mean is lambda x its share
                value = value * band.to(value.dtype)
        return value, logs

    def _in_band(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """(B,) bool: the samples whose timestep lies in [sddit_t_min, sddit_t_max); None when there is no band."""
        s = self.config
        if not s.has_band:
            return None
        band = timesteps >= s.sddit_t_min
        return band if s.sddit_t_max is None else band & (timesteps < s.sddit_t_max)

    def _accumulate_for_centre(self, step: int, teacher_out: torch.Tensor) -> None:
        # Micro-batches of one update add up; a new step (the last update skipped: no phase ran) starts over.
        total, count = teacher_out.sum(dim=0), torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device)
        if self._pending is not None and self._pending[0] == step:
            total, count = total + self._pending[1], count + self._pending[2]
        self._pending = (step, total, count)

    @torch.no_grad()
    def phase(self, ctx: StepContext, update: Update) -> tuple[dict[str, torch.Tensor], UpdateResult | None]:
        """After an applied update: teacher <- d teacher + (1 - d) student (encoder and head), then the centre
        moves toward the update's mean teacher output over all ranks."""
        student = {"encoder": self.student_encoder, "head": self.student_head}
        weight = 1 - self.config.sddit_ema_decay
        for part, module in student.items():
            for p_teacher, p_student in zip(self.teacher[part].parameters(), module.parameters(), strict=True):
                p_teacher.lerp_(p_student.detach().to(p_teacher.dtype), weight)
        if self.center is not None and self._pending is not None and self._pending[0] == ctx.step:
            totals = _all_reduce_sum(torch.cat([self._pending[1], self._pending[2][None]]))
            self.center.update(totals[:-1], totals[-1])
        self._pending = None
        return {}, None
