"""The end of a run: replicas checked, the stock pipeline exported (main process), sampled from its
reloaded copy, the model card written and pushed; then the trackers and process group closed."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from . import export
from .checkpointing import TrainState
from .config import RunConfig
from .distributed import is_fsdp
from .loop import Run
from .models import lora
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


def export_run(run: Run, data, output_dir: Path, state: TrainState, argv: list[str] | None, gathered=None) -> None:
    """Main process only: export the stock pipeline, sample from the reloaded export, card, push.

    `gathered`: under FSDP, a stock copy of the denoiser holding the gathered full weights (exported instead
    of the sharded module). The terms' modules are saved beside the pipeline (e.g. the structure
    discriminator, to resume from), never as pipeline components."""
    config, accelerator, adapter = run.config, run.accelerator, run.adapter
    t = config.training
    if run.weight_dtype != torch.float32 or adapter.released_text_encoders:
        adapter.reload_frozen_fp32()
    extra = {"structure_discriminator": term.unwrapped_disc for term in run.terms if term.name == "sadm"}
    lora_state = None
    with inference_pipeline(run, gathered) as pipeline:
        if config.model.use_lora:  # merge into a fresh fp32 base: stock loaders, base weights bit for bit
            model = run.unwrapped_denoiser
            lora_state = lora.lora_state_dict(model)
            base = adapter.load_component(adapter.denoiser_name)
            pipeline = adapter.export_pipeline(lora.merge_lora(base, model.peft_config[lora.ADAPTER_NAME], lora_state))
        elif config.model.trainable == "difffit":  # scale factors folded into the weights: a stock model
            from .models.difffit import folded_copy

            pipeline = adapter.export_pipeline(folded_copy(run.unwrapped_denoiser))
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
