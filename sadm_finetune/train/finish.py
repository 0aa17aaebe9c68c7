"""The end of a run: replicas checked, the outputs exported (main process): the stock pipeline, or for a LoRA run of a
family with a stock LoRA loader the LoRA file(s) alone; samples made from what was written, the model card written and
pushed; then the trackers and process group closed."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from ..export import outputs as export
from .checkpointing import TrainState
from ..config.run import RunConfig
from .distributed import is_fsdp
from .loop import Run
from ..tuners import lora
from .validation import inference_pipeline

logger = get_logger(__name__)

REPLICA_TOLERANCE = 1e-5  # largest absolute weight difference across ranks that counts as rounding, not a desync


def check_replicas(run: Run) -> None:
    """Several processes: prove the replicas did not drift apart before anything is exported."""
    accelerator = run.accelerator
    if accelerator.num_processes == 1:
        return
    from .distributed import replica_differences

    # Under FSDP the denoiser is sharded, not replicated: each rank holds a different part, nothing to compare.
    sharded = is_fsdp(accelerator)
    modules = {} if sharded else {"denoiser": run.unwrapped_denoiser}
    for name, module in run.joint_modules.items():  # trained with the denoiser (REPA's projector)
        modules[name] = accelerator.unwrap_model(module)
    for term in run.terms:
        for name, (module, _, _) in term.modules().items():
            modules[name] = accelerator.unwrap_model(module)
        for name, obj in term.state().items():  # EMA teachers: not trained by DDP, kept in step by the term
            if isinstance(obj, torch.nn.Module):
                modules[f"{term.name}_{name}"] = obj
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


EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def export_dtypes(config: RunConfig, adapter) -> dict[str, torch.dtype]:
    """Component name -> the dtype it is written in: --export_dtype for all, else each component's own dtype as the
    base stores it (fp32 where its files are not on this machine)."""
    from ..families.loading import stored_dtype

    chosen = config.model.export_dtype
    names = [name for name, module in adapter.pipeline.components.items() if isinstance(module, torch.nn.Module)]
    names += [name for name in adapter.released_text_encoders if name not in names]
    if chosen is not None:
        return {name: EXPORT_DTYPES[chosen] for name in names}
    return {name: stored_dtype(config.model, name) or torch.float32 for name in names}


def cast_components(pipeline, dtypes: dict[str, torch.dtype]) -> None:
    """Each module of the pipeline in its export dtype (in place: the run is over)."""
    for name, module in pipeline.components.items():
        if isinstance(module, torch.nn.Module) and name in dtypes and module.dtype != dtypes[name]:
            module.to(dtypes[name])


def export_run(run: Run, data, output_dir: Path, state: TrainState, argv: list[str] | None, gathered=None) -> None:
    """Main process only: export, sample from what was exported, card, push.

    A LoRA run of a family with a stock LoRA loader (SD, SDXL, SD3) writes the LoRA file(s) and samples the base
    pipeline with the written file applied by that loader; other runs (and those with --export_merged) write the
    stock pipeline (a LoRA merged into a fresh base) and sample its reloaded copy. `gathered`: under FSDP, a stock
    copy of the denoiser holding the gathered full weights (exported instead of the sharded module). The terms'
    modules are saved beside the output (e.g. the structure discriminator, to resume from), never as pipeline
    components."""
    config, accelerator, adapter = run.config, run.accelerator, run.adapter
    t, m = config.training, config.model
    # --train_text_encoder: the encoders' LoRA read out before the pipeline's encoders are replaced by fresh ones
    text_lora = text_encoder_lora(run)
    if run.weight_dtype != torch.float32 or adapter.released_text_encoders or m.quantize_text_encoders != "none" \
            or text_lora:
        adapter.reload_frozen_fp32()  # the export carries the base's frozen weights as stored, never quantized ones
    extra = {folder: module for term in run.terms for folder, module in term.export_modules().items()}
    dtypes = export_dtypes(config, adapter)
    with_pipeline = adapter.exports_pipeline(m)
    lora_state = lora_config = None
    with inference_pipeline(run, gathered) as pipeline:
        if m.use_lora:
            model = run.unwrapped_denoiser
            lora_config = model.peft_config[lora.ADAPTER_NAME]
            lora_state = lora.lora_state_dict(model)
            if with_pipeline:  # merged into a fresh base: stock loaders, the base's keys
                base = adapter.load_component(adapter.denoiser_name)
                pipeline = adapter.export_pipeline(lora.merge_lora(base, lora_config, lora_state))
                for name, (config_te, state_te) in text_lora.items():  # each text encoder's LoRA merged too
                    setattr(pipeline, name, lora.merge_lora(adapter.load_component(name), config_te, state_te))
        elif m.trainable == "difffit":  # scale factors folded into the weights: a stock model
            from ..tuners.difffit import folded_copy

            pipeline = adapter.export_pipeline(folded_copy(run.unwrapped_denoiser))
        if with_pipeline:
            cast_components(pipeline, dtypes)
            export.save_pipeline_atomically(pipeline, output_dir, extra)
        else:
            export.save_models_atomically(output_dir, extra)
        del pipeline
    lora_files: dict[str, str] = {}
    if lora_state is not None and adapter.lora_formats(m):  # LoHa / LoKr: the merged pipeline only
        state_out = lora.cast_state(lora_state, dtypes[adapter.denoiser_name])
        text_out = {name: (lora.cast_state(state_te, dtypes[name]), lora.lora_metadata(config_te))
                    for name, (config_te, state_te) in text_lora.items()}
        lora_files = adapter.save_lora_weights(output_dir, state_out, lora.lora_metadata(lora_config),
                                               kohya_labels(config, output_dir, adapter.default_resolution()),
                                               **({"text_encoder_lora": text_out} if text_out else {}))
    # The final samples come from what was written: the reloaded pipeline, or the base with the LoRA file applied.
    if with_pipeline:
        from diffusers import DiffusionPipeline

        sampler = DiffusionPipeline.from_pretrained(output_dir, use_safetensors=True, dtype=torch.float32)
    else:
        sampler = adapter.lora_pipeline(output_dir, lora_files.get("diffusers") or lora_files["kohya"])
    sampler.to(accelerator.device).set_progress_bar_config(disable=True)
    conditions = adapter.resolved_conditions(adapter.validation_conditions(t))
    with torch.no_grad():
        grid = adapter.sample_grid(sampler, t.num_validation_images, t.validation_inference_steps,
                                   t.validation_guidance_scale, t.seed or 0, conditions)
    export.save_grid(grid, output_dir / "samples" / "final.png")
    widget = []
    for i, condition in enumerate(conditions):  # one image per row: the card's gallery
        path = export.save_grid(grid[i:i + 1, :1], output_dir / "samples" / f"final-{i}.png")
        widget.append((adapter.condition_text(condition), path.relative_to(output_dir).as_posix()))
    del sampler
    write_card(run, data, output_dir, state, argv, lora_files, with_pipeline, conditions, widget)
    if t.push_to_hub:
        url = export.push_to_hub(output_dir, t.hub_model_id, t.hub_private)
        accelerator.print(f"Pushed to {url}")
    what = "the fine-tuned pipeline" if with_pipeline else f"the LoRA ({', '.join(lora_files.values())})"
    accelerator.print(f"Saved {what} to {output_dir}")


def text_encoder_lora(run: Run) -> dict[str, tuple]:
    """--train_text_encoder: component name -> (its LoRA config, its LoRA tensors as detached fp32 CPU copies) of
    each trained text encoder; empty without the option. The text encoders' LoRA is never EMA-averaged (the EMA
    covers the denoiser's trainable weights), so these are the final trained weights."""
    trained = getattr(run.adapter, "trained_text_encoders", None) or {}
    out = {}
    for name, module in trained.items():
        model = run.accelerator.unwrap_model(module)
        out[name] = (model.peft_config[lora.ADAPTER_NAME], lora.lora_state_dict(model))
    return out


def kohya_labels(config: RunConfig, output_dir: Path, resolution: int) -> dict[str, str]:
    """What the kohya file records about the run besides the network and the base (kohya's `ss_*` / `modelspec.*`
    names): title, resolution, date, licence, trigger phrase and the training settings kohya records."""
    import datetime

    from ..export.card import inherited_license, trigger_words
    from ..export.outputs import public_name

    m, t = config.model, config.training
    resolution = config.data.resolution or resolution
    licence = inherited_license(m)
    labels = {
        "modelspec.title": output_dir.name, "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.license": licence.get("license_name") or licence.get("license"),
        "modelspec.trigger_phrase": trigger_words(config),
        "ss_sd_model_name": public_name(m.pretrained_model_name_or_path), "ss_output_name": output_dir.name,
        "ss_learning_rate": t.learning_rate, "ss_max_train_steps": t.max_train_steps, "ss_seed": t.seed,
        **({"ss_unet_lr": t.learning_rate, "ss_text_encoder_lr": t.text_encoder_lr or t.learning_rate}
           if m.train_text_encoder else {}),
        "ss_training_comment": ", ".join(["sadm-finetune", *filter(None, (section.kohya_comment() for section
                                                                          in config.term_sections.values()))]),
    }
    labels.update({"modelspec.resolution": f"{resolution}x{resolution}",
                   "ss_resolution": f"({resolution}, {resolution})"})
    return labels


def write_card(run: Run, data, output_dir: Path, state: TrainState, argv: list[str] | None, lora_files: dict[str, str],
               with_pipeline: bool, conditions: list, widget: list[tuple[str, str]]) -> None:
    """The model card: what the folder holds, code that uses it, the run's settings."""
    from ..export.card import CardFacts, write_model_card

    config, accelerator, adapter = run.config, run.accelerator, run.adapter
    t, m = config.training, config.model
    summary = {
        "Training steps": state.global_step,
        "Global batch size": t.train_batch_size * accelerator.num_processes * t.gradient_accumulation_steps,
        "Learning rate": t.learning_rate,
        "Mixed precision": accelerator.mixed_precision,
        "Skipped non-finite updates": state.nonfinite_total,
    }
    repo = t.hub_model_id or str(output_dir)
    call = adapter.example_call(conditions[0], t.validation_inference_steps, t.validation_guidance_scale, t.seed or 0)
    usages = []
    if lora_files:
        weight_name = lora_files.get("diffusers") or lora_files["kohya"]
        lora_code = adapter.lora_usage(m.pretrained_model_name_or_path, repo, weight_name, call)
        usages.append((f"The LoRA on the base model (`{weight_name}`):", lora_code))
    if with_pipeline:
        heading = "The full pipeline (the LoRA merged):" if lora_files else "The fine-tuned pipeline:"
        where = len(usages) if adapter.stock_lora_loader else 0  # the LoRA file first where diffusers loads it
        usages.insert(where, (heading, adapter.pipeline_usage(repo, call)))
    facts = CardFacts(
        family_tags=adapter.card_tags(), data_description=data.description, summary=summary, usages=usages,
        lora_files=lora_files, pipeline=with_pipeline, stock_lora_loader=adapter.stock_lora_loader, widget=widget,
        prompts=[c for c in conditions if isinstance(c, str)], num_processes=accelerator.num_processes,
        mixed_precision=accelerator.mixed_precision, argv=argv,
    )
    write_model_card(output_dir, config, facts)


def end_training(accelerator: Accelerator) -> None:
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
