"""Typed run configuration: dataclasses defined once; YAML files and command-line flags derive from them.

Precedence: dataclass defaults < ``--config file.yaml`` < flags given on the command line. A YAML file
may group fields by section (``model:``, ``data:``, ``training:``, ``sadm:``) or list them flat;
field names are unique across sections, and every flag is ``--<field name>``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..utils.errors import ConfigError
from .fields import coerce, describe, help_field, index_fields, is_optional, read_yaml  # noqa: F401 (public here too)
from ..diffusion.flow_config import FlowMatchingConfig
from ..data.prior_config import PriorPreservationConfig
from ..terms.config import RepaConfig, SDDiTConfig

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)


_f = help_field


def _positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= 0:
            raise ConfigError(name, f"must be > 0, got {value}", f"set --{name} to a positive number")


def _non_negative(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < 0:
            raise ConfigError(name, f"must be >= 0, got {value}", f"set --{name} to 0 or more")


@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str | None = _f(
        None, "Hub id or local folder of the diffusers pipeline to fine-tune.", aliases=["--pretrained"]
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the pretrained pipeline.")
    variant: str | None = _f(None, "Weight variant to load, e.g. fp16.")
    pretrained_vae_model_name_or_path: str | None = _f(
        None, "A separate VAE (Hub id or folder with the VAE's config.json, e.g. madebyollin/sdxl-vae-fp16-fix) used "
        "to encode the training images and exported with the pipeline (default: the pipeline's own vae/).",
    )
    vae_revision: str | None = _f(None, "Hub revision of --pretrained_vae_model_name_or_path (default: its main).")
    allow_pickle_weights: bool = _f(
        False, "Allow loading .bin/.ckpt pickle weights when no safetensors exist (runs pickle code: trust the source)."
    )
    class_dropout_prob: float = _f(
        0.1, "Probability of replacing a class label by the null class (classifier-free guidance training)."
    )
    caption_dropout_prob: float = _f(
        0.1, "Probability of replacing a caption by the empty prompt (classifier-free guidance training, text models)."
    )
    guidance_scale: float | None = _f(
        None, "Guidance-distilled Flux.1 (dev): the value fed to the transformer's guidance embedding during training, "
        "as diffusers' train_dreambooth_lora_flux.py --guidance_scale (3.5, Flux's family default). Refused by other "
        "families; ignored by a transformer without guidance_embeds (schnell), as that script does.",
    )
    learned_sigma_loss: Literal["vlb", "ignore"] = _f(
        "vlb", "DiT learned-sigma channels: train them with DiT's variational-bound term, or leave them out."
    )
    gradient_checkpointing: bool = _f(False, "Trade compute for memory in the denoiser.")
    enable_xformers_memory_efficient_attention: bool = _f(
        False, "Use xformers attention (CUDA only; PyTorch SDPA is the default)."
    )
    trainable: Literal["full", "lora", "difffit"] = _f(
        "full",
        "What trains in the denoiser: all weights; LoRA adapters (peft); or DiffFit (Xie et al. 2023: biases, "
        "norms, class embeddings and learnable per-block scale factors, folded into the weights at export).",
    )
    lora_rank: int = _f(8, "LoRA rank r.")
    lora_alpha: float | None = _f(None, "LoRA alpha; the update is scaled by alpha / r (default: alpha = rank).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch's input.")
    lora_target_modules: list[str] | None = _f(
        None, "Module names (or name suffixes) that get LoRA (default: the family's attention projections)."
    )
    lora_export_format: Literal["diffusers", "kohya", "both"] | None = _f(
        None, "LoRA files a LoRA run writes: diffusers (pytorch_lora_weights.safetensors, for diffusers' "
        "load_lora_weights), kohya (pytorch_lora_weights_kohya.safetensors: lora_unet_ keys, .alpha and kohya's "
        "metadata, for ComfyUI, A1111/Forge and kohya's scripts; SD 1.x/2.x and SDXL only) or both. Default: both "
        "for SD 1.x/2.x and SDXL, diffusers for the other families.")
    export_merged: bool = _f(
        False, "LoRA runs of families with a stock diffusers LoRA loader (SD 1.x/2.x, SDXL, SD3): also write the full "
        "pipeline with the LoRA merged into its weights (DiT and PixArt LoRA runs always write it; without this flag "
        "the output is the LoRA file(s), card, samples, config and discriminator).")
    export_dtype: Literal["fp16", "bf16", "fp32"] | None = _f(
        None, "dtype of the exported weights (the full pipeline and the LoRA files). Default: the base's own, as "
        "stored in each component's weight files.")
    pos_embed_transfer: Literal["extend", "interpolate"] | None = _f(
        None,
        "DiT at a --resolution other than the base's: how its fixed sin-cos positional embedding covers the new "
        "token grid. extend (what none means): the base's positions continued with the same spacing, as a DiT built "
        "at that size computes them; the export (sample_size set to the new latent size) reproduces training exactly. "
        "interpolate (the new grid squeezed onto the base's range) is refused: a stock DiTPipeline cannot hold it "
        "(docs/design.md §7). DiT only.",
    )
    quantize_base: Literal["none", "int8", "nf4"] = _f(
        "none", "LoRA runs: load the frozen denoiser's weights quantized (int8, or nf4 on a CUDA GPU) through "
        "diffusers' quantization configs; the LoRA trains in fp32 on top and its file applies to the full-precision "
        "base. A merged export merges the LoRA into the base re-read at full precision (docs/design.md).",
    )
    quantize_text_encoders: Literal["none", "int8", "nf4"] = _f(
        "none", "Load the frozen text encoders quantized (same backends as --quantize_base); the export carries them "
        "at full precision. --cache_text_embeddings instead frees them after one pass over the prompts.",
    )
    quantize_backend: Literal["bitsandbytes", "torchao"] | None = _f(
        None, "Who quantizes: bitsandbytes (int8 LLM.int8, nf4; CUDA only) or torchao (int8 weight-only; runs on a "
        "CPU). Default: bitsandbytes where CUDA is visible, else torchao; nf4 is bitsandbytes only.",
    )

    def __post_init__(self) -> None:
        for name in ("class_dropout_prob", "caption_dropout_prob", "lora_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}", "use e.g. 0.1")
        _positive(self, "lora_rank", "lora_alpha", "guidance_scale")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ConfigError("lora_target_modules", "is an empty list", "name at least one module, or leave it unset")
        if self.vae_revision is not None and self.pretrained_vae_model_name_or_path is None:
            raise ConfigError("vae_revision", "is given without --pretrained_vae_model_name_or_path",
                              "drop --vae_revision (--revision picks the pipeline's own vae/), or name the VAE")
        if self.lora_export_format is not None and not self.use_lora:
            raise ConfigError("lora_export_format", f"{self.lora_export_format} is a LoRA file format and this run is "
                              "not a LoRA run", "add --trainable lora, or drop --lora_export_format")
        if self.export_merged and not self.use_lora:
            raise ConfigError("export_merged", f"is a LoRA option and --trainable {self.trainable} always writes the "
                              "full pipeline", "drop --export_merged")
        if self.quantize_base != "none" and not self.use_lora:
            raise ConfigError("quantize_base", f"quantizes a frozen base under LoRA and --trainable {self.trainable} "
                              "trains the base's own weights", "add --trainable lora, or drop --quantize_base")
        if self.quantize_backend is not None and self.quantize_base == self.quantize_text_encoders == "none":
            raise ConfigError("quantize_backend", "is given and nothing is quantized",
                              "add --quantize_base int8 (or --quantize_text_encoders int8), or drop --quantize_backend")
        if self.quantize_backend == "torchao" and "nf4" in (self.quantize_base, self.quantize_text_encoders):
            raise ConfigError("quantize_backend", "torchao has no nf4 here (nf4 is bitsandbytes' 4-bit type)",
                              "use int8 with torchao, or --quantize_backend bitsandbytes on a CUDA GPU")

    @property
    def use_lora(self) -> bool:
        return self.trainable == "lora"


@dataclass
class DataConfig:
    train_data_dir: str | None = _f(
        None, "Image folder: captioned by .txt sidecars, metadata.jsonl, kohya <N>_<name> folders or --instance_prompt; "
        "else subfolders are classes (sorted names -> ids 0..K-1).")
    dataset_name: str | None = _f(
        None, "A `datasets` name or path (or builtin:digits, scikit-learn's digits, for the offline demo)."
    )
    dataset_config_name: str | None = _f(None, "The `datasets` configuration name.")
    image_column: str = _f("image", "Column holding the images.")
    label_column: str | None = _f("label", "Column holding the integer class ids (None: unconditional).")
    caption_column: str | None = _f(
        "text", "Column holding the captions of text-to-image data (an image folder's metadata.jsonl key)."
    )
    resolution: int | None = _f(None, "Training resolution in pixels (default: the pipeline's own).")
    center_crop: bool = _f(False, "Center-crop to the resolution (default: random crop).")
    random_flip: bool = _f(False, "Flip images horizontally at random.")
    aspect_ratio_buckets: bool = _f(
        False, "Train each image at the aspect-ratio bucket of about resolution^2 pixels nearest its shape (diffusers' "
        "generate_aspect_ratio_buckets), resized to cover it and cropped; every batch is one bucket.",
    )
    max_train_samples: int | None = _f(None, "Use only the first N samples (debugging, quick runs).")
    on_bad_image: Literal["error", "skip"] = _f("error", "An unreadable image stops the run, or is skipped and counted.")
    dataloader_num_workers: int = _f(0, "Data-loader worker processes (0: load in the main process).")
    cache_latents: bool = _f(
        False, "Encode the data set through the VAE once and reuse the latents (across epochs and runs)."
    )
    latent_cache_dir: str = _f(
        "~/.cache/sadm-finetune/latents",
        "Where cached latents live; runs with the same VAE, data and transforms share them.",
    )
    cache_text_embeddings: bool = _f(
        False, "Encode every caption (and validation prompt) once with the text encoder(s), keep the embeddings on "
        "disk, and free the encoders before training.",
    )
    text_cache_dir: str = _f(
        "~/.cache/sadm-finetune/text-embeddings",
        "Where cached text embeddings live; runs with the same text encoders share them, prompt by prompt.",
    )
    instance_prompt: str | None = _f(
        None, "One caption for every image without one of its own (DreamBooth's instance prompt, e.g. 'a photo of sks "
        "dog'); also the default validation prompt and the model card's trigger words. Caption precedence: a "
        "sidecar .txt, then metadata.jsonl, then a kohya <N>_<name> folder name, then this.",
    )
    caption_prefix: str | None = _f(
        None, "Trigger words put in front of every instance caption, joined by a space (kohya's caption_prefix).")
    caption_extension: str = _f(
        ".txt", "Extension of the caption sidecar beside each image (same stem: a.png -> a.txt; kohya's default is "
        ".caption); its first line is the caption.",
    )
    dataset_repeats: int = _f(
        1, "Repeat every image this many times per epoch (times a kohya <N>_<name> folder's own N).")
    mask_column: str | None = _f(
        None, "Column of a `datasets` set holding loss masks (images: white trains, black is ignored). An image "
        "folder's masks are <stem>_mask.png files beside the images.",
    )

    def __post_init__(self) -> None:
        if self.train_data_dir and self.dataset_name:
            raise ConfigError(
                "train_data_dir", "given together with dataset_name", "pass only one of --train_data_dir / --dataset_name"
            )
        if self.mask_column is not None and self.train_data_dir:
            raise ConfigError("mask_column", "names a column of a --dataset_name set, and an image folder has none",
                              "drop --mask_column: put each mask beside its image as <stem>_mask.png")
        _positive(self, "resolution", "max_train_samples", "dataset_repeats")
        _non_negative(self, "dataloader_num_workers")
        if self.caption_extension and not self.caption_extension.startswith("."):
            self.caption_extension = "." + self.caption_extension  # as kohya accepts "txt"
        if self.cache_latents and not self.center_crop:
            raise ConfigError(
                "cache_latents", "needs --center_crop (a cached random crop would be the same crop in every epoch)",
                "add --center_crop, or drop --cache_latents to keep random crops",
            )


@dataclass
class TrainingConfig:
    output_dir: str = _f("sadm-output", "Where the fine-tuned pipeline, samples, logs and checkpoints go.")
    overwrite_output_dir: bool = _f(False, "Allow writing into an existing non-empty output_dir.")
    seed: int | None = _f(0, "Random seed (data order, noise, timesteps, initialisation of the discriminator).")
    train_batch_size: int = _f(8, "Samples per device per micro-batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer update.")
    max_train_steps: int = _f(1000, "Number of denoiser updates.")
    learning_rate: float = _f(1e-4, "Denoiser learning rate (AdamW).")
    lr_scheduler: Literal[LR_SCHEDULERS] = _f(
        "cosine", "Learning-rate schedule (diffusers get_scheduler). The default decays to 0 over the run: with "
        "EMA, the recipe under which SADM helps (README, Does SADM help?).")
    lr_warmup_steps: int | None = _f(
        None, "Linear learning-rate warm-up steps (default: 5% of max_train_steps, at most 500; a fresh AdamW "
        "state on a trained model eases into the full rate).")
    adam_beta1: float = _f(0.9, "AdamW beta1 of the denoiser optimizer.")
    adam_beta2: float = _f(0.999, "AdamW beta2 of the denoiser optimizer.")
    adam_weight_decay: float = _f(0.0, "AdamW weight decay of the denoiser optimizer.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon of both optimizers.")
    max_grad_norm: float | None = _f(1.0, "Clip gradient norms to this value (None: no clipping).")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _f(
        None, "Override accelerate's mixed precision (default: accelerate config / launch flag)."
    )
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    use_ema: bool | None = _f(
        None, "Keep an EMA of the trainable weights; the exported pipeline uses it. Default: on (off under FSDP, "
        "which cannot gather it); --no_use_ema turns it off.")
    ema_decay: float = _f(
        0.9999, "Largest EMA decay. The decay at update s is min(ema_decay, (1 + s) / (10 + s)) (diffusers' "
        "EMAModel), so a run of N updates averages about its last N/10 until 1 - 9/N reaches ema_decay (N ~ 90k "
        "for 0.9999): the default suits short fine-tunes and long ones.")
    checkpointing_steps: int | None = _f(None, "Save a resumable checkpoint every N steps (and on SIGTERM/SIGINT).")
    checkpoints_total_limit: int | None = _f(None, "Keep only the newest N checkpoints.")
    resume_from_checkpoint: str | None = _f(None, "Resume from `latest` or a checkpoint folder.")
    max_nonfinite_steps: int = _f(10, "Stop after this many non-finite updates in a row (each is skipped).")
    snr_gamma: float | None = _f(None, "Min-SNR-gamma weighting of the diffusion loss (5.0 is the usual value).")
    noise_offset: float = _f(0.0, "Offset noise scale.")
    report_to: str = _f("tensorboard", "Tracker for logs: tensorboard, wandb, all or none.")
    logging_dir: str = _f("logs", "Tracker folder, relative to output_dir.")
    validation_steps: int | None = _f(None, "Sample a validation grid every N steps (None: only at the end).")
    num_validation_images: int = _f(4, "Images per class / prompt in validation grids.")
    validation_class_labels: list[int] | None = _f(None, "Class ids in validation grids (default: up to 10).")
    validation_prompts: list[str] | None = _f(
        None, "Prompts in validation grids of text-to-image models (default: the first captions of the data)."
    )
    validation_inference_steps: int = _f(25, "Sampler steps for validation grids.")
    validation_guidance_scale: float = _f(1.5, "Classifier-free guidance scale for validation grids.")
    push_to_hub: bool = _f(False, "Upload the output folder to the Hub at the end.")
    hub_model_id: str | None = _f(None, "Hub repo id (org/name) to push to.")
    hub_private: bool = _f(False, "Create the Hub repo as private.")

    def __post_init__(self) -> None:
        _positive(
            self,
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "learning_rate",
            "max_grad_norm",
            "validation_steps",
            "num_validation_images",
            "validation_inference_steps",
            "snr_gamma",
            "checkpointing_steps",
            "checkpoints_total_limit",
            "max_nonfinite_steps",
        )
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError("ema_decay", f"must be in (0, 1), got {self.ema_decay}", "use e.g. 0.9999")
        _non_negative(self, "lr_warmup_steps", "adam_weight_decay", "noise_offset")
        if self.lr_warmup_steps is None:
            self.lr_warmup_steps = min(500, self.max_train_steps // 20)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}", "use e.g. 0.9 / 0.999")
        trackers = {"tensorboard", "wandb", "comet_ml", "mlflow", "all", "none"}
        if self.report_to not in trackers:
            raise ConfigError("report_to", f"unknown tracker {self.report_to!r}", f"use one of {sorted(trackers)}")
        if self.hub_model_id is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.hub_model_id)
            except HFValidationError:
                raise ConfigError(
                    "hub_model_id", f"{self.hub_model_id!r} is not a Hub repo id", "use the form org/name"
                ) from None


@dataclass
class SADMConfig:
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
    structure_diagnostics: bool = _f(
        True, "Log the real/fake structure gap seen by a fixed encoder (pooled latents, not D) and D's real/fake "
        "separability every step.",
    )
    disc_resume_from: str | None = _f(None, "Start the discriminator from a saved structure_discriminator folder.")

    def __post_init__(self) -> None:
        _non_negative(self, "structure_weight", "structure_warmup_steps", "disc_gradient_penalty", "disc_warmup_steps")
        _non_negative(self, "disc_weight_decay", "structure_grad_bands")
        _positive(self, "adaptive_weight_max")
        if self.pair_weighting != "geometric" and self.distance == "kl":
            raise ConfigError("pair_weighting", "applies to the mse/l1 distances (kl weights each row by w_i)",
                              "drop --pair_weighting or use --distance mse")
        _positive(self, "disc_max_grad_norm", "disc_pool")
        if not 0.0 <= self.disc_renoise <= 1.0:
            raise ConfigError("disc_renoise", f"must be in [0, 1], got {self.disc_renoise}", "use e.g. 0.5, or 0 for off")
        _positive(
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
        )

    @property
    def enabled(self) -> bool:
        return self.structure_weight > 0


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "flow_matching": FlowMatchingConfig,
    "sadm": SADMConfig,
    "repa": RepaConfig,
    "sddit": SDDiTConfig,
    "dreambooth": PriorPreservationConfig,
}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    sadm: SADMConfig = field(default_factory=SADMConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    sddit: SDDiTConfig = field(default_factory=SDDiTConfig)
    dreambooth: PriorPreservationConfig = field(default_factory=PriorPreservationConfig)
    # Not an option: the family defaults build_config filled in for the fields the user did not set
    # (family_defaults.py; docs/defaults.md), for the run's summary. Neither compared nor saved: the YAML holds them.
    family_defaults: dict = field(default_factory=dict, compare=False, repr=False)

    def validate(self) -> None:
        """Checks across sections; per-field checks run when each section is built."""
        if not self.model.pretrained_model_name_or_path:
            raise ConfigError(
                "pretrained_model_name_or_path", "is required", "pass --pretrained <hub id or folder>"
            )
        if not (self.data.train_data_dir or self.data.dataset_name):
            raise ConfigError("train_data_dir", "no training data given", "pass --train_data_dir or --dataset_name")
        if self.dreambooth.with_prior_preservation and self.data.aspect_ratio_buckets:
            raise ConfigError("aspect_ratio_buckets", "cannot be combined with --with_prior_preservation (a batch's "
                              "instance and class halves would need one shared bucket)",
                              "drop --aspect_ratio_buckets (images train at the square --resolution)")
        if self.sadm.enabled and self.training.train_batch_size < 2 and not self.dreambooth.with_prior_preservation:
            raise ConfigError(
                "train_batch_size",
                "is 1, so a batch has no pairs for the structure loss",
                "use --train_batch_size 2 or more, or --structure_weight 0",
            )
        if self.sadm.disc_steps > 1 and self.training.gradient_accumulation_steps > 1:
            raise ConfigError(
                "disc_steps", "> 1 cannot be combined with gradient_accumulation_steps > 1",
                "use --disc_steps 1, or no gradient accumulation",
            )
        if self.model.quantize_text_encoders != "none" and self.data.cache_text_embeddings:
            raise ConfigError("quantize_text_encoders", "is given with --cache_text_embeddings, which encodes every "
                              "prompt once and frees the text encoders before training",
                              "drop --quantize_text_encoders (or --cache_text_embeddings)")
        if self.training.push_to_hub and not self.training.hub_model_id:
            raise ConfigError("hub_model_id", "is required with --push_to_hub", "pass --hub_model_id org/name")
        if self.model.quantize_base != "none" or self.model.quantize_text_encoders != "none":
            from ..tuners.quantization import check_environment  # CUDA for bitsandbytes, the backend installed

            check_environment(self.model)
        if self.model.enable_xformers_memory_efficient_attention:
            import torch  # only here: a dry run of a plain recipe stays light

            if not torch.cuda.is_available():
                raise ConfigError(
                    "enable_xformers_memory_efficient_attention", "xformers needs a CUDA GPU and none is visible",
                    "drop the flag (PyTorch SDPA attention is the default)",
                )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        return {k: v for section in self.to_dict().values() for k, v in section.items()}


def field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Field name -> (section name, field); names are unique across sections."""
    return index_fields(SECTIONS)


def field_type(section: str, name: str) -> Any:
    return typing.get_type_hints(SECTIONS[section])[name]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe into a flat {field: value} mapping (sections or flat keys), checking every key."""
    return read_yaml(path, SECTIONS, program="sadm-train")


def build_config(overrides: dict[str, Any]) -> RunConfig:
    """Defaults updated with a flat {field: value} mapping; every section validates as it is built.

    Precedence: dataclass defaults < the pipeline family's own defaults (family_defaults.py: its upstream training
    script's values, e.g. SD3's logit-normal timesteps) < `overrides` (the YAML recipe and the flags)."""
    from ..families.defaults import defaults_for

    index = field_index()
    for key in overrides:
        if key not in index:
            raise ConfigError(key, "unknown field", "remove it or fix its spelling (see sadm-train --help)")
    family = {k: v for k, v in defaults_for(overrides.get("pretrained_model_name_or_path"),
                                              overrides.get("revision")).items() if k not in overrides}
    per_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in {**family, **overrides}.items():
        per_section[index[key][0]][key] = value
    config = RunConfig(**{name: SECTIONS[name](**values) for name, values in per_section.items()},
                       family_defaults=family)
    config.validate()
    return config


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(config.to_yaml())
