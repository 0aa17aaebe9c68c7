"""The training entry point: set-up, the loop (G step, D step, EMA, checkpoints, validation, logs), export."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from . import export
from .checkpointing import (CheckpointState, TrainState, checkpoints_dir, list_checkpoints, load_checkpoint,
                            resolve_resume, save_checkpoint)
from .config import RunConfig, save_config
from .distributed import any_rank, gathered_copy, is_fsdp, replicate_outside_fsdp
from .data import TrainDataset, open_train_data
from .errors import ConfigError, InputError, SADMError
from .models.discriminator import StructureDiscriminator
from .models import lora
from .models.loading import family_class, load_family
from .loader import build_train_dataloader
from .text_cache import build_text_cache, prompts_to_cache
from .step import StepRunner, weight_dtype_of

logger = get_logger(__name__)


def check_output_dir(config: RunConfig) -> Path:
    """Never write into a user's non-empty folder unless told to (or resuming in it)."""
    out = Path(config.training.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir: {out} is a file; pass a folder path")
    t = config.training
    busy = out.is_dir() and any(out.iterdir())
    if not busy or t.overwrite_output_dir:
        return out
    found = list_checkpoints(out)
    what = "a finished export (model_index.json)" if (out / "model_index.json").exists() else "files"
    if not t.resume_from_checkpoint:
        resume = "--resume_from_checkpoint latest to continue it, " if found else ""
        raise InputError(
            f"output_dir: {out} exists and is not empty (it holds {what}); pass --overwrite_output_dir to write into "
            f"it, {resume}or another --output_dir"
        )
    if t.resume_from_checkpoint == "latest" and not found:
        # Training from step 0 here would overwrite what the folder holds (e.g. a finished run's export).
        raise InputError(
            f"resume_from_checkpoint: no checkpoint found in {checkpoints_dir(out)}, so there is nothing to resume, "
            f"and {out} holds {what} that a fresh run would overwrite; pass --overwrite_output_dir to train from "
            "step 0 into it, or another --output_dir"
        )
    return out


def make_accelerator(config: RunConfig, output_dir: Path) -> Accelerator:
    t = config.training
    return Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / t.logging_dir)),
        # A sampler seeded by (seed, epoch): the data order of any epoch can be replayed on resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def _optimizer(params, lr: float, betas: tuple[float, float], weight_decay: float, eps: float):
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


class _StopRequest:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class RunSummary:
    output_dir: Path
    global_step: int
    stopped_early: bool


def train(config: RunConfig, argv: list[str] | None = None) -> RunSummary:
    t, s = config.training, config.sadm
    output_dir = check_output_dir(config)
    family_class(config.model).check_config(config)  # reads model_index.json only
    data = open_train_data(config.data)  # cheap: fails on a missing or empty source before any model loads
    accelerator = make_accelerator(config, output_dir)
    if t.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if t.seed is not None:
        set_seed(t.seed)

    _check_distributed_type(config, accelerator)
    adapter = load_family(config.model)
    resolution = config.data.resolution or adapter.default_resolution()
    adapter.check_resolution(resolution)
    adapter.check_data(data)
    global_batch = t.train_batch_size * accelerator.num_processes
    if len(data) < global_batch:
        raise ConfigError("train_batch_size", f"the data set has {len(data)} samples, fewer than one global batch "
                          f"({global_batch})", "lower --train_batch_size or add data")
    resume_path = resolve_resume(output_dir, t.resume_from_checkpoint)
    if t.resume_from_checkpoint == "latest" and resume_path is None:
        accelerator.print(f"resume_from_checkpoint latest: no checkpoint in {checkpoints_dir(output_dir)}; "
                          "starting from step 0")

    weight_dtype = weight_dtype_of(accelerator)
    adapter.prepare_training()
    # Before the frozen modules move: the text encoders run once over every prompt, then leave memory.
    text_cache = build_text_cache(accelerator, adapter, prompts_to_cache(adapter, data, t), config.data, weight_dtype,
                                  t.train_batch_size) if config.data.cache_text_embeddings else None
    for module in adapter.frozen_modules():
        module.requires_grad_(False)
        module.to(accelerator.device, dtype=weight_dtype)
        module.eval()
    denoiser = _prepare_denoiser(config, adapter, accelerator.device, weight_dtype)
    dataset, dataloader = build_train_dataloader(config, accelerator, adapter, data, resolution, text_cache)
    from diffusers.optimization import get_scheduler

    params_g = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer_g = _optimizer(params_g, t.learning_rate, (t.adam_beta1, t.adam_beta2), t.adam_weight_decay, t.adam_epsilon)
    scheduler_g = get_scheduler(t.lr_scheduler, optimizer_g, num_warmup_steps=t.lr_warmup_steps * accelerator.num_processes,
                                num_training_steps=t.max_train_steps * accelerator.num_processes)
    to_prepare: list[Any] = [denoiser, optimizer_g, scheduler_g]
    disc = None
    sharded = is_fsdp(accelerator)
    if s.enabled:
        disc = _build_discriminator(config, adapter)
        if sharded:  # D stays replicated beside the FSDP denoiser (distributed.replicate_outside_fsdp)
            disc = replicate_outside_fsdp(accelerator, disc)
        optimizer_d = _optimizer(disc.parameters(), s.disc_learning_rate, (s.disc_adam_beta1, s.disc_adam_beta2),
                                 s.disc_weight_decay, t.adam_epsilon)
        scheduler_d = get_scheduler("constant", optimizer_d)
        to_prepare += [] if sharded else [disc, optimizer_d, scheduler_d]
    prepared = accelerator.prepare(*to_prepare, dataloader)
    denoiser, optimizer_g, scheduler_g = prepared[:3]
    if s.enabled and sharded:
        # Not prepared by accelerate, so not in its files: D's state goes into the project's checkpoint files
        # (safetensors, below), not register_for_checkpointing's pickles (docs/checkpoints.md).
        unprepared_d = {"discriminator": accelerator.unwrap_model(disc), "disc_optimizer": optimizer_d,
                        "disc_scheduler": scheduler_d}
    elif not s.enabled:
        disc, optimizer_d, scheduler_d = None, None, None
    else:
        disc, optimizer_d, scheduler_d = prepared[3:6]
    dataloader = prepared[-1]
    if config.model.use_lora:
        lora.register_lora_checkpointing(accelerator, denoiser)  # checkpoints hold the LoRA, not the base

    ema = None
    if t.use_ema:
        from diffusers.training_utils import EMAModel

        trainable = [p for p in accelerator.unwrap_model(denoiser).parameters() if p.requires_grad]
        ema = EMAModel(trainable, decay=t.ema_decay)
        ema.to(accelerator.device)
    state = TrainState()
    # The project's own checkpoint state: JSON / safetensors files, never accelerate's pickled custom states.
    saved = CheckpointState()
    saved.add("train_state", state)
    for name, obj in (unprepared_d if s.enabled and sharded else {}).items():
        saved.add(name, obj)
    if ema is not None:
        saved.add("ema", ema)

    runner = StepRunner(config, adapter, accelerator, denoiser, optimizer_g, scheduler_g,
                        disc, optimizer_d, scheduler_d, ema)
    if resume_path is not None:
        load_checkpoint(accelerator, resume_path, saved)
        accelerator.print(f"Resumed from {resume_path} at step {state.global_step}")

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "training_config.yaml")
        accelerator.init_trackers("sadm-finetune", config=_tracker_config(config))
    _log_summary(accelerator, config, data, denoiser, disc, resolution, global_batch)

    stopped_early = _loop(config, accelerator, runner, dataloader, dataset, state, saved, output_dir)
    accelerator.wait_for_everyone()
    _check_replicas(accelerator, runner)
    if stopped_early:
        _end_training(accelerator)
        return RunSummary(output_dir, state.global_step, True)

    # FSDP: the full state dict is gathered onto the main process (all ranks take part) for a stock export.
    gathered = gathered_copy(accelerator, runner.denoiser) if is_fsdp(accelerator) else None
    if accelerator.is_main_process:
        _finish(config, accelerator, adapter, runner, data, output_dir, state, argv, gathered)
    del gathered
    _end_training(accelerator)
    return RunSummary(output_dir, state.global_step, False)


def _end_training(accelerator: Accelerator) -> None:
    """Barrier, then accelerate's end_training (which destroys the process group) in a single process.

    Mitigates a teardown hang seen with 2 CPU processes over gloo (torch 2.13, gdb backtraces): after the
    last collectives, a gloo worker thread may still be releasing a finished work that holds tensors created
    in Python (releasing them needs the GIL), while the main thread, holding the GIL, destroys the process
    group through the DDP reducer and joins that thread. A pause only narrowed the race, so with several
    processes the group is not destroyed here at all: `cli.main` ends such a process with os._exit."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        # Several processes: finish the trackers but leave the process group to the process exit, which
        # `cli.main` makes with os._exit once everything is written (no destructor, so no teardown race).
        for tracker in accelerator.trackers:
            tracker.finish()
        return
    accelerator.end_training()


def _loop(config: RunConfig, accelerator: Accelerator, runner: "StepRunner", dataloader, dataset: TrainDataset,
          state: TrainState, saved: CheckpointState, output_dir: Path) -> bool:
    """Run until max_train_steps; returns True if stopped early by a signal."""
    t = config.training
    stopping = False
    progress = tqdm(total=t.max_train_steps, initial=state.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    with _StopRequest() as stop, progress:
        while state.global_step < t.max_train_steps:
            dataloader.set_epoch(state.epoch)
            dataset.set_epoch(state.epoch)
            batches = dataloader
            if state.batches_in_epoch:
                batches = accelerator.skip_first_batches(dataloader, state.batches_in_epoch)
            for batch in batches:
                state.batches_in_epoch += 1
                logs = runner.micro_step(batch, state)
                if logs is None:  # mid-accumulation
                    continue
                state.global_step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{logs['loss_diffusion']:.4f}")
                accelerator.log(logs, step=state.global_step)
                _after_update(config, accelerator, runner, state, saved, output_dir)
                # The stop decision is collective: a signal that reached one rank stops all of them at this step.
                stopping = any_rank(stop.requested, accelerator.device)
                if stopping or state.global_step >= t.max_train_steps:
                    break
            else:  # the epoch ran out
                state.epoch += 1
                state.batches_in_epoch = 0
                continue
            if stopping:
                path = save_checkpoint(accelerator, output_dir, state.global_step, t.checkpoints_total_limit, saved)
                accelerator.print(
                    f"Stopped by signal at step {state.global_step}; checkpoint saved to {path}. Resume with the same "
                    "command plus --resume_from_checkpoint latest"
                )
                return True
    return False


def _after_update(config: RunConfig, accelerator: Accelerator, runner: "StepRunner", state: TrainState,
                  saved: CheckpointState, output_dir: Path) -> None:
    t = config.training
    if state.nonfinite_in_a_row >= t.max_nonfinite_steps:
        last = list_checkpoints(output_dir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written"
        raise SADMError(
            f"max_nonfinite_steps: {state.nonfinite_in_a_row} updates in a row had a non-finite loss or gradient "
            f"(step {state.global_step}); {where}. Lower --learning_rate / --structure_weight or use bf16 instead of fp16"
        )
    if t.checkpointing_steps and state.global_step % t.checkpointing_steps == 0:
        save_checkpoint(accelerator, output_dir, state.global_step, t.checkpoints_total_limit, saved)
    if t.validation_steps and state.global_step % t.validation_steps == 0:
        # FSDP: the denoiser is sharded; every rank helps gather a stock copy for the main process to sample.
        model = gathered_copy(accelerator, runner.denoiser) if is_fsdp(accelerator) else None
        if accelerator.is_main_process:
            runner.validate(output_dir / "samples" / f"step-{state.global_step}.png", state.global_step, model)
        del model
        accelerator.wait_for_everyone()


def _finish(config: RunConfig, accelerator: Accelerator, adapter, runner: "StepRunner", data, output_dir: Path,
            state: TrainState, argv: list[str] | None, gathered=None) -> None:
    """Main process only: export the stock pipeline, sample from the reloaded export, card, push.

    `gathered`: under FSDP, a stock copy of the denoiser holding the gathered full weights (exported instead
    of the sharded module)."""
    t = config.training
    if runner.weight_dtype != torch.float32 or adapter.released_text_encoders:
        adapter.reload_frozen_fp32()
    extra = {"structure_discriminator": runner.unwrapped_disc} if runner.unwrapped_disc is not None else {}
    lora_state = None
    with runner.inference_pipeline(gathered) as pipeline:
        if config.model.use_lora:  # merge into a fresh fp32 base: stock loaders, base weights bit for bit
            model = runner.unwrapped_denoiser
            lora_state = lora.lora_state_dict(model)
            base = adapter.load_component(adapter.denoiser_name)
            pipeline = adapter.export_pipeline(lora.merge_lora(base, model.peft_config[lora.ADAPTER_NAME], lora_state))
        elif config.model.trainable == "difffit":  # scale factors folded into the weights: a stock model
            from .models.difffit import folded_copy

            pipeline = adapter.export_pipeline(folded_copy(runner.unwrapped_denoiser))
        export.save_pipeline_atomically(pipeline, output_dir, extra)
    if lora_state is not None:
        adapter.save_lora_weights(output_dir, lora_state, lora.lora_metadata(model.peft_config[lora.ADAPTER_NAME]))
    from diffusers import DiffusionPipeline

    reloaded = DiffusionPipeline.from_pretrained(output_dir, use_safetensors=True).to(accelerator.device)
    reloaded.set_progress_bar_config(disable=True)
    grid = adapter.sample_grid(reloaded, t.num_validation_images, t.validation_inference_steps,
                               t.validation_guidance_scale, t.seed or 0, adapter.validation_conditions(t))
    export.save_grid(grid, output_dir / "samples" / "final.png")
    del reloaded
    summary = {
        "Training steps": state.global_step,
        "Global batch size": t.train_batch_size * accelerator.num_processes * t.gradient_accumulation_steps,
        "Learning rate": t.learning_rate,
        "Mixed precision": accelerator.mixed_precision,
        "Skipped non-finite updates": state.nonfinite_total,
    }
    lora_usage = None
    if config.model.use_lora:
        lora_usage = adapter.lora_usage(config.model.pretrained_model_name_or_path, t.hub_model_id or str(output_dir))
    export.write_model_card(output_dir, config, adapter.card_tags(), data.description, summary, argv, lora_usage)
    if t.push_to_hub:
        url = export.push_to_hub(output_dir, t.hub_model_id, t.hub_private)
        accelerator.print(f"Pushed to {url}")
    accelerator.print(f"Saved the fine-tuned pipeline to {output_dir}")


def _check_distributed_type(config: RunConfig, accelerator: Accelerator) -> None:
    """Which sharded set-ups the toolkit runs (docs/scaling.md, section 3).

    FSDP (1 or 2): the denoiser is the only model accelerate prepares (and shards); the discriminator stays
    a replicated DDP module beside it, and validation and export gather the full weights onto the main
    process. LoRA/DiffFit, EMA and fp16 are not wired for a sharded denoiser and stop here."""
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind == "FSDP":
        fix = "use DDP (accelerate launch --multi_gpu) for it"
        if config.model.trainable != "full":
            raise ConfigError("trainable", f"--trainable {config.model.trainable} is not supported under FSDP (the "
                              "adapter export reads the unwrapped, sharded denoiser)",
                              f"use --trainable full, or {fix}")
        if config.training.use_ema:
            raise ConfigError("use_ema", "EMA is not supported under FSDP (it would average local shards, which the "
                              "export does not gather)", f"drop --use_ema, or {fix}")
        if config.sadm.enabled and accelerator.mixed_precision == "fp16":
            raise ConfigError("mixed_precision", "fp16 with SADM under FSDP is not supported (the replicated "
                              "discriminator has no gradient scaler)", "use bf16")
    if config.sadm.enabled and kind == "DEEPSPEED":
        raise ConfigError("structure_weight", "SADM is not supported under DeepSpeed: accelerate prepares one "
                          "model per DeepSpeed Accelerator and accelerator.backward runs and steps that model's "
                          "engine, so the discriminator needs its own unprepared update path, which is not written because "
                          "it cannot be tested here (accelerate never selects DeepSpeed on a CPU-only machine)",
                          "use FSDP or DDP (accelerate launch --multi_gpu), or --structure_weight 0")


REPLICA_TOLERANCE = 1e-5  # largest absolute weight difference across ranks that counts as rounding, not a desync


def _check_replicas(accelerator: Accelerator, runner: StepRunner) -> None:
    """Several processes: prove the replicas did not drift apart before anything is exported."""
    if accelerator.num_processes == 1:
        return
    from .distributed import replica_differences

    # Under FSDP the denoiser is sharded, not replicated: each rank holds a different part, nothing to compare.
    sharded = is_fsdp(accelerator)
    modules = {} if sharded else {"denoiser": runner.unwrapped_denoiser}
    if runner.unwrapped_disc is not None:
        modules["discriminator"] = runner.unwrapped_disc
    # DDP all-reduces the gradients, so every rank applies the same update to the same weights and the
    # replicas stay bit-identical in practice (measured: 2 CPU processes, gloo). The comparison is exact
    # (element by element against rank 0's copy), so "identical" below means bit for bit. Bits that differ
    # by rounding only (e.g. ranks on different hardware) warn; a real desync (a gap beyond
    # REPLICA_TOLERANCE, such as one skipped update) stops the run before anything is exported.
    diffs = replica_differences(modules)
    if any(gap > REPLICA_TOLERANCE for _, gap in diffs.values()):
        raise RuntimeError(f"replicas differ across processes after training (elements differing, largest absolute "
                           f"difference): {diffs}; the checkpoints hold rank 0's weights")
    if any(count for count, _ in diffs.values()):
        logger.warning("replica check: the replicas differ by rounding only (elements differing, largest absolute "
                       "difference): %s; exporting rank 0's weights", diffs, main_process_only=True)
    elif modules:
        accelerator.print(f"replica check: {', '.join(modules)} bit-identical on all {accelerator.num_processes} "
                          "processes" + ("; denoiser sharded (FSDP), one copy" if sharded else ""))


def _prepare_denoiser(config: RunConfig, adapter, device: torch.device, weight_dtype: torch.dtype):
    """Training mode, memory options and (with --use_lora) the LoRA layers of the denoiser."""
    denoiser = adapter.denoiser
    denoiser.train()
    if config.model.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if config.model.enable_xformers_memory_efficient_attention:
        _enable_xformers(denoiser)
    if config.model.use_lora:
        # The frozen base is held in weight_dtype (half the memory under bf16/fp16); LoRA weights stay fp32.
        denoiser.to(device)
        if weight_dtype != torch.float32:
            denoiser.to(dtype=weight_dtype)
        lora.attach_lora(denoiser, lora.make_lora_config(config.model, adapter.lora_target_modules))
    elif config.model.trainable == "difffit":
        from .models.difffit import attach_difffit

        try:
            attach_difffit(denoiser)
        except ValueError as e:
            raise ConfigError("trainable", str(e), "use --trainable full or lora for this model") from None
    return denoiser


def _build_discriminator(config: RunConfig, adapter) -> StructureDiscriminator:
    s = config.sadm
    if s.disc_resume_from:
        path = Path(s.disc_resume_from)
        if not (path / "config.json").is_file():
            raise InputError(f"disc_resume_from: {path} has no config.json; pass a structure_discriminator folder")
        return StructureDiscriminator.from_pretrained(path, use_safetensors=True)
    num_classes = getattr(adapter, "num_classes", 0) if s.disc_class_conditional else 0
    return StructureDiscriminator(
        in_channels=adapter.latent_channels, base_channels=s.disc_width, num_blocks=s.disc_depth,
        embed_dim=s.disc_embed_dim, num_classes=num_classes, spectral_norm=s.disc_spectral_norm,
    )


def _enable_xformers(denoiser) -> None:
    from diffusers.utils.import_utils import is_xformers_available

    if not torch.cuda.is_available():
        raise ConfigError("enable_xformers_memory_efficient_attention", "xformers needs a CUDA GPU and none is visible",
                          "drop the flag (PyTorch SDPA attention is the default)")
    if not is_xformers_available():
        raise ConfigError("enable_xformers_memory_efficient_attention", "xformers is not installed",
                          "pip install 'sadm-finetune[gpu]' or drop the flag")
    denoiser.enable_xformers_memory_efficient_attention()


def _tracker_config(config: RunConfig) -> dict[str, Any]:
    # Trackers take scalars only: lists become strings, None becomes "none".
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.flat().items()}


def _log_summary(accelerator, config, data, denoiser, disc, resolution, global_batch) -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    lines = [
        f"data: {data.description}, {len(data)} samples, resolution {resolution}",
        f"steps: {config.training.max_train_steps}, effective batch "
        f"{global_batch * config.training.gradient_accumulation_steps} ({accelerator.num_processes} processes)",
        f"denoiser: {count(denoiser) / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M trainable"
        + (f" (LoRA rank {config.model.lora_rank})" if config.model.use_lora else ""),
        f"precision: {accelerator.mixed_precision}, device: {accelerator.device}",
    ]
    if disc is not None:
        ratio = count(disc) / max(1, count(denoiser))
        lines.append(f"SADM: lambda {config.sadm.structure_weight}, discriminator {count(disc) / 1e6:.3f} M parameters "
                     f"({100 * ratio:.1f}% of the denoiser)")
        if ratio > 0.1:
            logger.warning("the structure discriminator has %.0f%% of the denoiser's parameters; consider a smaller "
                           "--disc_width / --disc_depth", 100 * ratio, main_process_only=True)
    else:
        lines.append("SADM: off (structure_weight 0): plain fine-tune")
    for line in lines:
        logger.info(line, main_process_only=True)
        accelerator.print(line)
