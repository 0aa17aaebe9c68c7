"""The training entry point: checks, set-up (builders.py), the loop (loop.py) with its checkpoints and
validation, the end (finish.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from .builders import build_run, log_summary, make_accelerator, tracker_config, weight_dtype_of
from .checkpointing import (TrainState, checkpoints_dir, list_checkpoints, load_checkpoint, resolve_resume,
                            save_checkpoint)
from ..config.run import RunConfig, save_config
from ..data.datasets import open_train_data
from .distributed import gathered_copy, is_fsdp, shared_random_seed
from ..utils.errors import ConfigError, SADMError
from .finish import check_replicas, end_training, export_run
from .loop import Run, train_loop
from .output_dir import StartMarker, check_output_dir as output_dir_check
from ..families.loading import family_class, load_family
from ..data.prior import check_personalization, ensure_class_images, open_class_data
from ..data.loader import build_train_dataloader
from ..terms import check_terms
from ..data.text_cache import build_text_cache, prompts_to_cache
from .validation import validate


def check_output_dir(config: RunConfig) -> Path:
    """Never write into a user's non-empty folder unless told to (or resuming in it); output_dir.py."""
    return output_dir_check(config)[0]


def place_frozen_modules(adapter, device: torch.device, weight_dtype: torch.dtype) -> None:
    """The modules that never train, frozen, in eval mode, on the device in weight_dtype; the VAE fp32 under fp16
    (`FamilyAdapter.frozen_dtype`, models/vae.py)."""
    from ..tuners.quantization import is_quantized

    for module in adapter.frozen_modules():
        module.requires_grad_(False)
        if is_quantized(module):  # --quantize_text_encoders: loaded in its dtype, which a quantized model keeps
            module.to(device)
        else:
            module.to(device, dtype=adapter.frozen_dtype(module, weight_dtype))
        module.eval()


@dataclass
class RunSummary:
    output_dir: Path
    global_step: int
    stopped_early: bool


def train(config: RunConfig, argv: list[str] | None = None) -> RunSummary:
    t = config.training
    output_dir, leftovers = output_dir_check(config)
    family = family_class(config.model)  # reads model_index.json only
    family.check_config(config)  # the options its declared capabilities do not cover, refused in one line
    data = open_train_data(config.data)  # cheap: fails on a missing or empty source before any model loads
    check_personalization(config, family, data)
    accelerator = make_accelerator(config, output_dir)
    if accelerator.mixed_precision == "fp16" and not accelerator.native_amp:  # accelerate's fp16 on a CPU
        raise ConfigError("mixed_precision", f"fp16 on {accelerator.device.type} runs without autocast in accelerate, "
                          "so the fp16 frozen modules could not feed the fp32 trainable weights",
                          "use bf16 (or no) on this device; fp16 needs a GPU")
    if t.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if t.seed is None:  # --seed none: a fresh seed (a resumed run's own), the same on every rank
        t.seed = _seed_for_none(accelerator, output_dir, t.resume_from_checkpoint)
    set_seed(t.seed)

    _check_distributed_type(config, accelerator)
    adapter = load_family(config.model, weight_dtype_of(accelerator))  # a quantized base: its layers' dtype
    resolution = config.data.resolution or adapter.default_resolution()
    adapter.set_resolution(resolution)  # a DiT at another size: sample_size and positional embedding
    adapter.check_data(data)
    check_terms(config, adapter, accelerator)
    global_batch = t.train_batch_size * accelerator.num_processes
    if len(data) < global_batch:
        raise ConfigError("train_batch_size", f"the data set has {len(data)} samples, fewer than one global batch "
                          f"({global_batch})", "lower --train_batch_size or add data")
    resume_path = resolve_resume(output_dir, t.resume_from_checkpoint)
    if t.resume_from_checkpoint == "latest" and resume_path is None:
        accelerator.print(f"resume_from_checkpoint latest: no checkpoint in {checkpoints_dir(output_dir)}; "
                          "starting from step 0")

    class_data = None
    if config.dreambooth.with_prior_preservation:  # class images from the base pipeline, before anything trains
        ensure_class_images(accelerator, adapter, config)
        class_data = open_class_data(config)

    adapter.prepare_training()
    weight_dtype = weight_dtype_of(accelerator)
    # Before the frozen modules move: the text encoders run once over every prompt, then leave memory.
    prompts = prompts_to_cache(adapter, data, t) + ([config.dreambooth.class_prompt] if class_data else [])
    text_cache = build_text_cache(accelerator, adapter, prompts, config.data, weight_dtype,
                                  t.train_batch_size) if config.data.cache_text_embeddings else None
    place_frozen_modules(adapter, accelerator.device, weight_dtype)
    dataset, dataloader = build_train_dataloader(config, accelerator, adapter, data, resolution, text_cache,
                                                 class_data)
    run, dataloader, saved = build_run(config, accelerator, adapter, dataloader)
    # The project's own checkpoint state: JSON / safetensors files, never accelerate's pickled custom states.
    state = TrainState()
    saved.add("train_state", state)
    if resume_path is not None:
        load_checkpoint(accelerator, resume_path, saved)
        accelerator.print(f"Resumed from {resume_path} at step {state.global_step}")

    marker = StartMarker(output_dir, t.logging_dir)
    if leftovers:
        accelerator.print(f"output_dir: {output_dir} holds only what a run that stopped before its first update left "
                          f"({', '.join(leftovers)}); writing into it")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        marker.write()  # removed after the first applied update: until then the folder never blocks a rerun
        save_config(config, output_dir / "training_config.yaml")
        accelerator.init_trackers("sadm-finetune", config=tracker_config(config))
    log_summary(accelerator, config, data, run, resolution, global_batch)
    if class_data is not None:
        accelerator.print(f"prior preservation: {class_data.description}, prior loss weight "
                          f"{config.dreambooth.prior_loss_weight}; each batch {t.train_batch_size} instance + "
                          f"{t.train_batch_size} class samples")

    def on_update(s: TrainState) -> None:
        marker.clear_after_update(s.global_step, s.nonfinite_total)
        _on_update(run, s, saved, output_dir)

    stopped_early = train_loop(run, dataloader, dataset, state, on_update)
    if stopped_early:
        path = save_checkpoint(accelerator, output_dir, state.global_step, t.checkpoints_total_limit, saved)
        accelerator.print(f"Stopped by signal at step {state.global_step}; checkpoint saved to {path}. Resume with the "
                          "same command plus --resume_from_checkpoint latest")
    accelerator.wait_for_everyone()
    check_replicas(run)
    if stopped_early:
        end_training(accelerator)
        return RunSummary(output_dir, state.global_step, True)

    # FSDP: the full state dict is gathered onto the main process (all ranks take part) for a stock export.
    gathered = gathered_copy(accelerator, run.denoiser) if is_fsdp(accelerator) else None
    if accelerator.is_main_process:
        export_run(run, data, output_dir, state, argv, gathered)
        marker.clear()
    del gathered
    end_training(accelerator)
    return RunSummary(output_dir, state.global_step, False)


def _on_update(run: Run, state: TrainState, saved, output_dir: Path) -> None:
    """After each update: the non-finite guard, periodic checkpoints and validation grids."""
    t, accelerator = run.config.training, run.accelerator
    if state.nonfinite_in_a_row >= t.max_nonfinite_steps:
        last = list_checkpoints(output_dir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written"
        skipped = ", ".join([f"nonfinite_updates {state.nonfinite_total}",
                             *(f"{k} {v}" for k, v in sorted(state.term_nonfinite.items()))])
        lower = " / ".join(["--learning_rate", *(f"--{name}" for section in run.config.term_sections.values()
                                                 if section.enabled for name in section.stability_fields)])
        raise SADMError(
            f"max_nonfinite_steps: {state.nonfinite_in_a_row} updates in a row had a non-finite loss or gradient "
            f"(step {state.global_step}; skipped so far: {skipped}); {where}. Lower {lower} or use bf16 instead of fp16"
        )
    if t.checkpointing_steps and state.global_step % t.checkpointing_steps == 0:
        save_checkpoint(accelerator, output_dir, state.global_step, t.checkpoints_total_limit, saved)
    if t.validation_steps and state.global_step % t.validation_steps == 0:
        # FSDP: the denoiser is sharded; every rank helps gather a stock copy for the main process to sample.
        model = gathered_copy(accelerator, run.denoiser) if is_fsdp(accelerator) else None
        if accelerator.is_main_process:
            validate(run, output_dir / "samples" / f"step-{state.global_step}.png", state.global_step, model)
        del model
        accelerator.wait_for_everyone()


def _seed_for_none(accelerator: Accelerator, output_dir: Path, resume_from_checkpoint: str | None) -> int:
    """--seed none: a fresh random seed, printed and saved in training_config.yaml (train() writes it). A run that
    resumes a checkpoint continues with the seed of the run that wrote it (its training_config.yaml, beside
    checkpoints/), so that the resumed steps draw the noise and data order the uninterrupted run would have."""
    import yaml

    resume_path = resolve_resume(output_dir, resume_from_checkpoint)
    if resume_path is None:
        seed = shared_random_seed(accelerator)
        accelerator.print(f"seed: none given; drew --seed {seed} (saved in training_config.yaml; pass it to rerun)")
        return seed
    saved = resume_path.parent.parent / "training_config.yaml"
    try:
        seed = yaml.safe_load(saved.read_text())["training"]["seed"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        seed = None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError("seed", f"is none and the run that wrote {resume_path} left no seed in {saved}",
                          "pass --seed with the seed that run used")
    accelerator.print(f"seed: none given; resuming {resume_path.name} with its run's --seed {seed}")
    return seed


def _check_distributed_type(config: RunConfig, accelerator: Accelerator) -> None:
    """Which sharded set-ups the toolkit runs (docs/scaling.md, section 3).

    FSDP (1 or 2): the denoiser is the only model accelerate prepares (and shards); the terms' own modules stay
    replicated DDP modules beside it, and validation and export gather the full weights onto the main
    process. LoRA/DiffFit, EMA and fp16 are not wired for a sharded denoiser and stop here."""
    for section in config.term_sections.values():  # each term's own launch checks (SADM: not under DeepSpeed)
        section.check_accelerator(config, accelerator)
    if is_fsdp(accelerator):
        fix = "use DDP (accelerate launch --multi_gpu) for it"
        if config.model.trainable != "full":
            raise ConfigError("trainable", f"--trainable {config.model.trainable} is not supported under FSDP (the "
                              "adapter export reads the unwrapped, sharded denoiser)",
                              f"use --trainable full, or {fix}")
        if config.training.use_ema:
            raise ConfigError("use_ema", "EMA is not supported under FSDP (it would average local shards, which the "
                              "export does not gather)", f"drop --use_ema, or {fix}")
        if config.training.optimizer != "adamw":  # D stays replicated beside FSDP: --disc_optimizer is free
            raise ConfigError("optimizer", f"{config.training.optimizer} is not wired for FSDP's sharded parameters "
                              "(8-bit AdamW's blocks and Prodigy's step-size sums would be per shard)",
                              f"use --optimizer adamw, or {fix}")
        if config.training.use_ema is None:
            accelerator.print("EMA: off under FSDP (the default is on elsewhere; FSDP cannot gather it)")
            config.training.use_ema = False
    if config.training.use_ema is None:  # the default: on
        config.training.use_ema = True
