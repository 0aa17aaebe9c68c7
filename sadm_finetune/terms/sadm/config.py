"""SADM's config section (`sadm:` in a recipe, `config.sadm`, a flag per field), registered as the term "sadm"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ...config.fields import non_negative, positive
from ...config.fields import help_field as _f
from ...utils.errors import ConfigError
from ..registry import TermConfig, capability_gap

DISCRIMINATOR_FOLDER = "structure_discriminator"  # D saved beside the exported pipeline (--disc_resume_from reads it)


@dataclass
class SADMConfig(TermConfig):
    """SADM's section (`sadm:`): the structure loss, its discriminator and its schedule."""

    title = "SADM"
    weight_field = "structure_weight"
    stability_fields = ("disc_learning_rate", "structure_weight")

    structure_weight: float = _f(0.01, "lambda: weight of the structure loss for the denoiser (0: plain fine-tune).")
    structure_warmup_steps: int = _f(100, "lambda ramps linearly from 0 over this many steps (after disc_warmup_steps).")
    relation: Literal["cosine", "euclidean", "rbf"] = _f("cosine", "Pairwise relation between embeddings.")
    distance: Literal["mse", "l1", "kl"] = _f("mse", "Distance between the real and fake relation matrices.")
    kl_temperature: float = _f(0.1, "Softmax temperature of the row-wise KL distance.")
    timestep_weighting: Literal["min_snr", "none", "cutoff"] = _f(
        "min_snr", "Noise-level weight of each sample in the structure loss."
    )
    structure_snr_gamma: float = _f(5.0, "gamma of the min-SNR structure weighting: w = min(SNR, gamma) / gamma.")
    structure_t_cutoff: int = _f(300, "With timestep_weighting=cutoff: only timesteps below this count.")
    pair_weighting: Literal["geometric", "min"] = _f(
        "geometric", "Weight of the pair (i, j) in L_S from the samples' noise-level weights: geometric, "
        "sqrt(w_i w_j) (a noisy sample paired with a clean one keeps a constant push on its noise prediction); "
        "min, min(w_i, w_j) (the noisy sample's push shrinks with its SNR). Relation distances mse/l1 only.",
    )
    adversarial_loss: Literal["relations", "per_sample_ns", "per_sample_hinge"] = _f(
        "relations", "What D and the denoiser play: relations (SADM: distance of the pairwise relation matrices); "
        "per_sample_ns / per_sample_hinge (a control without structure: D scores each sample real or fake, "
        "non-saturating or hinge GAN loss, the same D, noise-level weights and schedule).",
    )
    disc_frozen: bool = _f(
        False, "Never update D: it stays at its random initialisation and L_S is a fixed random-feature "
        "regulariser (a control without an adversary).",
    )
    adaptive_weight: bool = _f(
        False, "Scale lambda each step by ||dL_diff/d out|| / ||dL_S/d out|| at the denoiser's output (VQGAN's "
        "adaptive GAN weight, taken at the output rather than the last layer so that it holds for every family "
        "and LoRA): structure_weight is then the structure gradient's size relative to the denoising one.",
    )
    adaptive_weight_max: float = _f(1e4, "Upper clamp of the adaptive factor (VQGAN: 1e4).")
    structure_grad_bands: int = _f(
        0, "Log the per-sample gradient norm of lambda * L_S and of the unweighted denoising MSE with respect to "
        "the denoiser's output, averaged in this many equal timestep bands (0: off; costs one extra backward "
        "through D).",
    )
    structure_gather: bool = _f(True, "Relations over the global batch (gather embeddings across processes).")
    disc_learning_rate: float = _f(1e-4, "Structure discriminator learning rate (AdamW).")
    disc_adam_beta1: float = _f(0.5, "AdamW beta1 of the discriminator optimizer.")
    disc_adam_beta2: float = _f(0.999, "AdamW beta2 of the discriminator optimizer.")
    disc_weight_decay: float = _f(1e-4, "AdamW weight decay of the discriminator (its regulariser).")
    disc_gradient_penalty: float = _f(0.0, "Weight of an R1-style gradient penalty on real latents (0: off).")
    disc_steps: int = _f(1, "Discriminator updates per discriminator turn.")
    disc_every: int = _f(1, "A discriminator turn every N denoiser updates.")
    disc_warmup_steps: int = _f(0, "Steps in which the discriminator trains while lambda stays 0.")
    disc_width: int = _f(32, "Channels of the discriminator's first conv block (doubling per block).")
    disc_depth: int = _f(3, "Number of stride-2 conv blocks in the discriminator.")
    disc_embed_dim: int = _f(128, "Dimension of the discriminator's embedding.")
    disc_spectral_norm: bool = _f(True, "Spectral normalisation on the discriminator's convs and linears.")
    disc_class_conditional: bool = _f(False, "Condition the discriminator on class labels too.")
    disc_max_grad_norm: float | None = _f(1.0, "Clip the discriminator's gradient norm to this value (None: no clipping).")
    disc_renoise: float = _f(
        0.0, "Instance noise: D sees both z0 and x0_hat re-noised to the level s = floor(disc_renoise * t) with one "
        "shared noise draw (0: off; 1: the sample's own level t).",
    )
    disc_real_lowpass: bool = _f(
        False, "Low-pass the real side before D with the Wiener filter of the sample's noise level, so that real and "
        "predicted latents carry the same detail (the posterior mean's blur is then no tell).",
    )
    disc_pool: int = _f(1, "Average-pool both sides by this factor before D (relations on low-resolution features).")
    disc_augment: Literal["none", "translation", "cutout", "translation,cutout"] = _f(
        "none", "DiffAugment for D, paired (few-shot data, where D sees the same few images again and again): sample "
        "i's real and predicted latents get the same random translation (up to 1/8 of the side, zero fill) and/or "
        "cutout (a zeroed square of half the side), drawn anew at every D call; differentiable in x0_hat.",
    )
    disc_space: Literal["latents", "features"] = _f(
        "latents", "What D reads: latents (the VAE latents z0 and x0_hat), or features (a frozen vision encoder's "
        "patch features of the VAE-decoded z0 and x0_hat: relations in a semantic space; the structure gradient "
        "reaches x0_hat through the encoder and the VAE decoder).",
    )
    disc_encoder: str = _f(
        "facebook/dinov2-small", "With disc_space features: the frozen vision encoder (a transformers model id or "
        "folder, as --repa_encoder).",
    )
    disc_encoder_resolution: int = _f(224, "With disc_space features: the encoder sees images of this size squared.")
    structure_diagnostics: bool = _f(
        True, "Log structure_gap_fixed every step: the real/fake structure gap seen by a fixed encoder (pooled "
        "latents, not D). D's own separability (d_pair_cos) is logged with SADM on either way.",
    )
    disc_resume_from: str | None = _f(None, "Start the discriminator from a saved structure_discriminator folder.")

    def __post_init__(self) -> None:
        non_negative(self, "structure_weight", "structure_warmup_steps", "disc_gradient_penalty", "disc_warmup_steps")
        non_negative(self, "disc_weight_decay", "structure_grad_bands")
        positive(self, "adaptive_weight_max")
        if self.pair_weighting != "geometric" and self.distance == "kl":
            raise ConfigError("pair_weighting", "applies to the mse/l1 distances (kl weights each row by w_i)",
                              "drop --pair_weighting or use --distance mse")
        positive(self, "disc_max_grad_norm", "disc_pool")
        if not 0.0 <= self.disc_renoise <= 1.0:
            raise ConfigError("disc_renoise", f"must be in [0, 1], got {self.disc_renoise}", "use e.g. 0.5, or 0 for off")
        positive(
            self,
            "kl_temperature",
            "structure_snr_gamma",
            "structure_t_cutoff",
            "disc_learning_rate",
            "disc_steps",
            "disc_every",
            "disc_width",
            "disc_depth",
            "disc_embed_dim",
            "disc_encoder_resolution",
        )

    # -- the registry's interface (terms/registry.py) ----------------------------------------------------
    def build(self, config, adapter, process, autocast) -> list:
        """SADM's term when on; the structure probe whenever structure_diagnostics is set (with SADM off too, so a
        plain run logs its baseline). This order is part of the checkpoint layout."""
        from .objective import SADMObjective
        from .term import SADMTerm, StructureProbe

        terms = []
        if self.enabled:
            terms.append(SADMTerm(config, adapter, process, config.training.adam_epsilon))
        if self.structure_diagnostics:
            terms.append(StructureProbe(SADMObjective(self, process)))
        return terms

    def check(self, config) -> None:
        if self.enabled and config.training.train_batch_size < 2 and not config.dreambooth.with_prior_preservation:
            raise ConfigError(
                "train_batch_size",
                "is 1, so a batch has no pairs for the structure loss",
                "use --train_batch_size 2 or more, or --structure_weight 0",
            )
        if self.disc_steps > 1 and config.training.gradient_accumulation_steps > 1:
            raise ConfigError(
                "disc_steps", "> 1 cannot be combined with gradient_accumulation_steps > 1",
                "use --disc_steps 1, or no gradient accumulation",
            )

    def check_family(self, config, family) -> None:
        super().check_family(config, family)
        if self.disc_class_conditional and "class_labels" not in family.capabilities:
            raise ConfigError("disc_class_conditional", capability_gap(family, "class_labels"),
                              "drop --disc_class_conditional")

    def check_accelerator(self, config, accelerator) -> None:
        if not self.enabled:
            return
        from accelerate.utils import DistributedType

        kind = accelerator.distributed_type
        if kind == DistributedType.FSDP and accelerator.mixed_precision == "fp16":
            raise ConfigError("mixed_precision", "fp16 with SADM under FSDP is not supported (the replicated "
                              "discriminator has no gradient scaler)", "use bf16")
        if kind == DistributedType.DEEPSPEED:
            raise ConfigError("structure_weight", "SADM is not supported under DeepSpeed: accelerate prepares one "
                              "model per DeepSpeed Accelerator and accelerator.backward runs and steps that model's "
                              "engine, so the discriminator needs its own unprepared update path, which is not "
                              "written because it cannot be tested here (accelerate never selects DeepSpeed on a "
                              "CPU-only machine)",
                              "use FSDP or DDP (accelerate launch --multi_gpu), or --structure_weight 0")

    def summary_off(self) -> list[str]:
        return ["SADM: off (structure_weight 0): plain fine-tune"]

    def card_intro(self) -> str:
        mode = (f"structure weight lambda = {self.structure_weight}" if self.enabled
                else "structure loss off (plain fine-tune baseline)")
        return ("using SADM, structure-guided adversarial\ntraining (Yang et al., CVPR 2024, arXiv:2402.17563): besides "
                "the denoising loss, a structure discriminator\ncompares the pairwise relations of real and predicted "
                f"clean latents in each batch; {mode}")

    def card_tags(self) -> list[str]:
        return ["structure-guided-adversarial-training"]

    def card_table(self) -> tuple[str, list[tuple[str, Any]]]:
        return "SADM settings", list(vars(self).items())  # with SADM off too: the baseline's settings

    def card_files(self) -> dict[str, str]:
        return {DISCRIMINATOR_FOLDER: "SADM's discriminator, to continue with `--disc_resume_from`"}

    def kohya_comment(self) -> str:
        return f"SADM structure weight {self.structure_weight}"
