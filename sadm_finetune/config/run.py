"""Typed run configuration: dataclasses defined once; YAML files and command-line flags derive from them.

Precedence: dataclass defaults < ``--config file.yaml`` < flags given on the command line. A YAML file
may group fields by section (``model:``, ``data:``, ``training:``, ``sadm:``) or list them flat;
field names are unique across sections, and every flag is ``--<field name>``. The loss terms' sections (``sadm:``,
``repa:``, ``sddit:``, and any term registered later) come from the term registry (terms/registry.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

import yaml

from ..utils.errors import ConfigError
from .fields import help_field, index_fields, read_yaml
from .fields import non_negative as _non_negative, positive as _positive
from ..diffusion.flow_config import FlowMatchingConfig
from ..data.prior_config import PriorPreservationConfig
from ..terms import term_sections as registered_terms

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)


_f = help_field


def _check_xformers() -> None:
    """--enable_xformers_memory_efficient_attention's one check (builders.prepare_denoiser only switches it on)."""
    import importlib.util

    import torch  # only here: a dry run of a plain recipe stays light

    name = "enable_xformers_memory_efficient_attention"
    if not torch.cuda.is_available():
        raise ConfigError(name, "xformers needs a CUDA GPU and none is visible",
                          "drop the flag (PyTorch SDPA attention is the default)")
    if importlib.util.find_spec("xformers") is None:
        raise ConfigError(name, "xformers is not installed", "pip install 'sadm-finetune[gpu]' or drop the flag")


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
    lora_type: Literal["lora", "dora", "loha", "lokr"] = _f(
        "lora", "Adapter kind of a LoRA run (peft): lora; dora (weight-decomposed LoRA, peft's use_dora: the LoRA file "
        "gains one magnitude vector per module and loads with diffusers' load_lora_weights); loha / lokr (LyCORIS' "
        "Hadamard / Kronecker products: no stock diffusers loader reads them, so the run exports the pipeline with the "
        "adapter merged and no adapter file; --lora_dropout does not apply).")
    lora_rank_pattern: dict[str, int] | None = _f(
        None, "Per-module ranks overriding --lora_rank (peft's rank_pattern): module-name regex or suffix -> rank, "
        "e.g. attn1.to_q=16,ff.net.2=4 (YAML: a mapping). The LoRA file carries each module's shape.")
    lora_alpha_pattern: dict[str, float] | None = _f(
        None, "Per-module alphas overriding --lora_alpha (peft's alpha_pattern), written like --lora_rank_pattern; "
        "the LoRA file's metadata carries them (the kohya file: folded into each module's lora_up).")
    train_text_encoder: bool = _f(
        False, "LoRA runs of SD 1.x/2.x and SDXL: also train a LoRA on the text encoder(s)' attention projections "
        "(q_proj, k_proj, v_proj, out_proj, as diffusers' train_dreambooth_lora*.py), saved in the same LoRA files "
        "(text_encoder / text_encoder_2 keys; kohya: lora_te_ / lora_te1_, lora_te2_). Text embeddings are then "
        "computed every step, so --cache_text_embeddings is refused.")
    text_encoder_lora_rank: int | None = _f(
        None, "--train_text_encoder: the text encoders' LoRA rank (default: --lora_rank); their alpha is --lora_alpha "
        "when given, else this rank.")
    quantize_base: Literal["none", "int8", "nf4"] = _f(
        "none", "LoRA runs: load the frozen denoiser's weights quantized (int8, or nf4 on a CUDA GPU) through "
        "diffusers' quantization configs; the LoRA trains in fp32 on top and its file applies to the full-precision "
        "base. A merged export merges the LoRA into the base re-read at full precision (docs/design.md).",
    )
    quantize_text_encoders: Literal["none", "int8", "nf4"] = _f(
        "none", "Load the frozen text encoders quantized (same backends as --quantize_base); the export carries them "
        "at full precision. With --cache_text_embeddings they encode the prompts once, quantized, and are freed (the "
        "cache's key records the quantization).",
    )
    quantize_backend: Literal["bitsandbytes", "torchao"] | None = _f(
        None, "Who quantizes: bitsandbytes (int8 LLM.int8, nf4; CUDA only) or torchao (int8 weight-only; runs on a "
        "CPU). Default: bitsandbytes where CUDA is visible, else torchao; nf4 is bitsandbytes only.",
    )

    def __post_init__(self) -> None:
        for name in ("class_dropout_prob", "caption_dropout_prob", "lora_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}", "use e.g. 0.1")
        _positive(self, "lora_rank", "lora_alpha", "guidance_scale", "text_encoder_lora_rank")
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
        if self.enable_xformers_memory_efficient_attention:
            _check_xformers()
        self._check_lora_options()
        self._check_quantization()

    def _check_lora_options(self) -> None:
        given = [name for name in ("lora_rank_pattern", "lora_alpha_pattern") if getattr(self, name) is not None]
        if self.lora_type != "lora":
            given.insert(0, "lora_type")
        if given and not self.use_lora:
            raise ConfigError(given[0], "is a LoRA option and this run is not a LoRA run",
                              f"add --trainable lora, or drop --{given[0]}")
        for name in ("lora_rank_pattern", "lora_alpha_pattern"):
            for key, value in (getattr(self, name) or {}).items():
                if value <= 0:
                    raise ConfigError(name, f"{key}={value}: values must be > 0", f"give {key} a positive value")
        if self.lora_type in ("loha", "lokr"):
            if self.lora_dropout:
                raise ConfigError("lora_dropout", f"is the LoRA branch's dropout and --lora_type {self.lora_type} has "
                                  "none", "drop --lora_dropout")
            if self.lora_export_format is not None:
                raise ConfigError("lora_export_format", f"no stock diffusers loader reads {self.lora_type} files, so "
                                  "the run exports the merged pipeline", "drop --lora_export_format")
        if self.train_text_encoder and (not self.use_lora or self.lora_type != "lora"):
            raise ConfigError("train_text_encoder", "trains a LoRA on the text encoders and this run is "
                              f"--trainable {self.trainable}" + (f" --lora_type {self.lora_type}" if self.use_lora
                                                                 else "") + " (full fine-tuning of the text "
                              "encoders is not offered)", "use --trainable lora --lora_type lora, or drop "
                              "--train_text_encoder")
        if self.text_encoder_lora_rank is not None and not self.train_text_encoder:
            raise ConfigError("text_encoder_lora_rank", "is given without --train_text_encoder",
                              "add --train_text_encoder, or drop --text_encoder_lora_rank")
        if self.lora_type == "dora" and self.lora_export_format in ("kohya", "both"):
            raise ConfigError("lora_export_format", "kohya's LoRA format has no DoRA magnitude vectors",
                              "use --lora_export_format diffusers (diffusers' load_lora_weights reads DoRA)")

    def _check_quantization(self) -> None:
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
    seed: int | None = _f(
        0, "Random seed (data order, noise, timesteps, initialisation of the discriminator, sampling of the grids). "
        "none: a fresh random seed, drawn once per run, printed and saved in training_config.yaml.")
    train_batch_size: int = _f(8, "Samples per device per micro-batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer update.")
    max_train_steps: int = _f(1000, "Number of denoiser updates.")
    learning_rate: float = _f(1e-4, "Denoiser learning rate (AdamW).")
    text_encoder_lr: float | None = _f(
        None, "--train_text_encoder: the text encoders' LoRA learning rate (a second parameter group of the "
        "denoiser's optimizer, under the same schedule; default: --learning_rate).")
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
    checkpointing_steps: int | None = _f(
        None, "Save a resumable checkpoint every N steps (None: none on a schedule; a run stopped by SIGTERM/SIGINT "
        "saves one either way).")
    checkpoints_total_limit: int | None = _f(None, "Keep only the newest N checkpoints.")
    resume_from_checkpoint: str | None = _f(None, "Resume from `latest` or a checkpoint folder.")
    max_nonfinite_steps: int = _f(10, "Stop after this many non-finite updates in a row (each is skipped).")
    snr_gamma: float | None = _f(None, "Min-SNR-gamma weighting of the diffusion loss (5.0 is the usual value).")
    noise_offset: float = _f(0.0, "Offset noise scale.")
    report_to: str = _f("tensorboard", "Tracker for logs: tensorboard, wandb, comet_ml, mlflow, all or none.")
    logging_dir: str = _f("logs", "Tracker folder, relative to output_dir.")
    grad_bands: int = _f(
        0, "Diagnostic: split the timesteps into K equal bands (band 0 the cleanest) and log, per band and loss term "
        "(the denoising loss as `diffusion`), the norm of the weighted term's gradient on the denoiser's trainable "
        "parameters from that band's samples (grad_band{k}_{term}) and its share of the band's sum "
        "(grad_share_band{k}_{term}); one extra backward per band and term, on the main process; 0: off.")
    grad_bands_every: int = _f(10, "With --grad_bands: measure every N updates (the update's last micro-batch).")
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
    optimizer: Literal["adamw", "adamw_8bit", "prodigy"] = _f(
        "adamw", "Denoiser optimizer: torch's AdamW; bitsandbytes' 8-bit AdamW (AdamW8bit: 8-bit moments for "
        "tensors of 4096+ elements); or Prodigy (prodigyopt: learns the step size; use --learning_rate 1.0, as "
        "diffusers' scripts advise). The adam_* options apply to all three.")
    disc_optimizer: Literal["adamw", "adamw_8bit", "prodigy"] = _f(
        "adamw", "Optimizer of the SADM structure discriminator (choices as --optimizer; its disc_* options apply).")
    prodigy_beta3: float | None = _f(
        None, "Prodigy's beta3 (the step-size estimate's EMA coefficient; default: sqrt(beta2)).")
    prodigy_decouple: bool = _f(True, "Prodigy: AdamW-style decoupled weight decay.")
    prodigy_use_bias_correction: bool = _f(
        True, "Prodigy: Adam's bias correction (on, as diffusers' scripts default).")
    prodigy_safeguard_warmup: bool = _f(
        True, "Prodigy: leave the LR warm-up out of the step-size estimate (on, as diffusers' scripts default).")
    prodigy_d_coef: float = _f(1.0, "Prodigy's d_coef: scales the learned step size (below 1: smaller steps).")

    def __post_init__(self) -> None:
        _positive(
            self,
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "learning_rate",
            "text_encoder_lr",
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
        _non_negative(self, "lr_warmup_steps", "adam_weight_decay", "noise_offset", "grad_bands")
        _positive(self, "grad_bands_every")
        if self.lr_warmup_steps is None:
            self.lr_warmup_steps = min(500, self.max_train_steps // 20)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}", "use e.g. 0.9 / 0.999")
        _positive(self, "prodigy_d_coef")
        if self.prodigy_beta3 is not None and not 0.0 <= self.prodigy_beta3 < 1.0:
            raise ConfigError("prodigy_beta3", f"must be in [0, 1), got {self.prodigy_beta3}", "use e.g. 0.999")
        from ..train.optimizers import check_installed

        for name in ("optimizer", "disc_optimizer"):
            check_installed(name, getattr(self, name))
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


CORE_SECTIONS: dict[str, type] = {  # the run's own sections; the terms' go between training's and dreambooth's
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "flow_matching": FlowMatchingConfig,
    "dreambooth": PriorPreservationConfig,
}
_CORE_FIRST = ("model", "data", "training", "flow_matching")  # before the terms' sections (YAML and --help order)


def _ordered(core: dict[str, Any], terms: dict[str, Any]) -> dict[str, Any]:
    """Section name -> value in the one order of sections: model, data, training, flow_matching, the terms'
    (registration order), dreambooth."""
    return {**{k: core[k] for k in _CORE_FIRST}, **terms, **{k: v for k, v in core.items() if k not in _CORE_FIRST}}


class _Sections(Mapping):
    """Section name -> dataclass, read live from the term registry (a term registered later gets its flags and YAML
    section too)."""

    def _all(self) -> dict[str, type]:
        return _ordered(CORE_SECTIONS, registered_terms())

    def __getitem__(self, name: str) -> type:
        return self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


SECTIONS: Mapping[str, type] = _Sections()


@dataclass(init=False)
class RunConfig:
    """The run's sections: the core ones as fields, the registered terms' in `term_sections` (name -> config, in
    registration order), each readable as an attribute too (`config.<term>.<field>`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    dreambooth: PriorPreservationConfig = field(default_factory=PriorPreservationConfig)
    term_sections: dict[str, Any] = field(default_factory=dict)
    # Not an option: the family defaults build_config filled in for the fields the user did not set
    # (family_defaults.py; docs/defaults.md), for the run's summary. Neither compared nor saved: the YAML holds them.
    family_defaults: dict = field(default_factory=dict, compare=False, repr=False)

    def __init__(self, model: ModelConfig | None = None, data: DataConfig | None = None,
                 training: TrainingConfig | None = None, flow_matching: FlowMatchingConfig | None = None,
                 dreambooth: PriorPreservationConfig | None = None, term_sections: dict[str, Any] | None = None,
                 family_defaults: dict | None = None, **terms: Any) -> None:
        """Missing sections get their defaults; a term's section may be given by name (`sadm=SADMConfig(...)`)."""
        self.model = model if model is not None else ModelConfig()
        self.data = data if data is not None else DataConfig()
        self.training = training if training is not None else TrainingConfig()
        self.flow_matching = flow_matching if flow_matching is not None else FlowMatchingConfig()
        self.dreambooth = dreambooth if dreambooth is not None else PriorPreservationConfig()
        registered = registered_terms()
        unknown = set(terms) - set(registered)
        if unknown:
            raise TypeError(f"RunConfig: no section named {sorted(unknown)} (registered terms: {list(registered)})")
        given = {**(term_sections or {}), **terms}
        self.term_sections = {name: given[name] if name in given else cls() for name, cls in registered.items()}
        self.family_defaults = dict(family_defaults or {})

    def __getattr__(self, name: str) -> Any:  # only for names that are not attributes: the terms' sections
        sections = self.__dict__.get("term_sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"'RunConfig' object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        sections = self.__dict__.get("term_sections")
        if sections is not None and name in sections:
            sections[name] = value
        else:
            super().__setattr__(name, value)

    def sections(self) -> dict[str, Any]:
        """Section name -> this run's section object, in the order of `SECTIONS`."""
        return _ordered({name: getattr(self, name) for name in CORE_SECTIONS}, self.term_sections)

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
        for section in self.term_sections.values():  # each term's own checks across sections
            section.check(self)
        if self.training.push_to_hub and not self.training.hub_model_id:
            raise ConfigError("hub_model_id", "is required with --push_to_hub", "pass --hub_model_id org/name")
        if self.model.train_text_encoder and self.data.cache_text_embeddings:
            raise ConfigError("cache_text_embeddings", "cannot be used with --train_text_encoder (the text encoders "
                              "train, so their embeddings change every step)", "drop --cache_text_embeddings")
        if self.training.text_encoder_lr is not None and not self.model.train_text_encoder:
            raise ConfigError("text_encoder_lr", "is given without --train_text_encoder",
                              "add --train_text_encoder, or drop --text_encoder_lr")
        if self.model.quantize_base != "none" or self.model.quantize_text_encoders != "none":
            from ..tuners.quantization import check_environment  # CUDA for bitsandbytes, the backend installed

            check_environment(self.model)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(section) for name, section in self.sections().items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        return {k: v for section in self.to_dict().values() for k, v in section.items()}


def field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Field name -> (section name, field); names are unique across sections."""
    return index_fields(SECTIONS)


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
    sections = dict(SECTIONS)
    per_section: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, value in {**family, **overrides}.items():
        per_section[index[key][0]][key] = value
    config = RunConfig(**{name: sections[name](**values) for name, values in per_section.items()},
                       family_defaults=family)
    config.validate()
    return config


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(config.to_yaml())
