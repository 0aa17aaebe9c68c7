"""Building a run from its config: the accelerator, the denoiser's trainable set, the loss terms, the optimizers, and accelerate's `prepare` (training.train calls these in order)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

from .checkpointing import CheckpointState
from ..config.run import RunConfig
from .distributed import is_fsdp, replicate_outside_fsdp
from ..utils.errors import ConfigError
from ..diffusion.losses import LearnedSigmaVLB
from .loop import Run
from .optimizers import make_optimizer
from ..tuners import lora
from ..diffusion.process import make_process
from ..terms import build_terms

# The standard logger, not accelerate's: its records carry a "[RANK 0]" prefix even in a single process.
logger = logging.getLogger(__name__)


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


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    """The dtype of frozen modules under accelerate's mixed precision (trainable weights stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def prepare_denoiser(config: RunConfig, adapter, device: torch.device, weight_dtype: torch.dtype):
    """Training mode, memory options and the trainable set (all weights, LoRA layers or DiFFit's)."""
    denoiser = adapter.denoiser
    denoiser.train()
    if config.model.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if config.model.enable_xformers_memory_efficient_attention:  # checked in ModelConfig (CUDA, installed)
        denoiser.enable_xformers_memory_efficient_attention()
    if config.model.use_lora:
        # The frozen base is held in weight_dtype (half the memory under bf16/fp16); LoRA weights stay fp32.
        denoiser.to(device)
        if weight_dtype != torch.float32 and not getattr(denoiser, "is_quantized", False):
            # (a quantized base was loaded with its unquantized layers in weight_dtype: families/loading.py)
            denoiser.to(dtype=weight_dtype)
        lora.attach_lora(denoiser, lora.make_lora_config(config.model, adapter.lora_target_modules))
    elif config.model.trainable == "difffit":
        from ..tuners.difffit import attach_difffit

        try:
            attach_difffit(denoiser)
        except ValueError as e:
            raise ConfigError("trainable", str(e), "use --trainable full or lora for this model") from None
    return denoiser


def prepare_text_encoders(config: RunConfig, adapter) -> dict[str, torch.nn.Module]:
    """--train_text_encoder: LoRA layers on the text encoders (already frozen and placed in weight_dtype by
    `entry.place_frozen_modules`); only they require grad, in fp32. Returns them by component name (none without
    the option)."""
    if not config.model.train_text_encoder:
        return {}
    encoders = adapter.text_encoders()
    for name, encoder in encoders.items():
        exclude = adapter.text_encoder_lora_exclude(name, encoder)  # layers whose output the family never reads
        lora.attach_lora(encoder, lora.make_text_encoder_lora_config(config.model, exclude))
        encoder.train()  # as diffusers' scripts: the LoRA branch's dropout (--lora_dropout) is active
        if config.model.gradient_checkpointing:  # as diffusers' scripts (transformers: non-reentrant by default)
            # transformers' newer name; `gradient_checkpointing_enable` is its deprecated alias in later 5.x releases
            enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
            enable()
    return encoders


def optimizer_groups(config: RunConfig, params: list, text_params: list) -> list:
    """The denoiser's optimizer's parameters: a list of tensors, or with --train_text_encoder two parameter groups,
    the text encoders' at --text_encoder_lr (default: --learning_rate), as diffusers' train_dreambooth_lora*.py."""
    if not text_params:
        return params
    t = config.training
    lr = t.text_encoder_lr if t.text_encoder_lr is not None else t.learning_rate
    return [{"params": params, "lr": t.learning_rate}, {"params": text_params, "lr": lr}]


def build_run(config: RunConfig, accelerator: Accelerator, adapter, dataloader) -> tuple[Run, Any, CheckpointState]:
    """The denoiser, its optimizer and LR schedule, the loss terms and their modules, EMA, all prepared by
    accelerate in one fixed order (the checkpoint layout: denoiser, its optimizer and schedule, the terms'
    joint modules, then each term's own module, optimizer and schedule). Returns the run, the prepared
    dataloader, and the project's own checkpoint state (to which the caller adds the loop counters)."""
    from diffusers.optimization import get_scheduler

    t = config.training
    weight_dtype = weight_dtype_of(accelerator)
    denoiser = prepare_denoiser(config, adapter, accelerator.device, weight_dtype)
    text_encoders = prepare_text_encoders(config, adapter)
    process = make_process(adapter.pipeline.scheduler.config, accelerator.device, config.flow_matching,
                           adapter.latent_patch_size)
    terms = build_terms(config, adapter, process, accelerator.autocast)
    joint = {f"{term.name}.{name}": module for term in terms for name, module in term.joint_modules().items()}
    sharded = is_fsdp(accelerator)
    if sharded and joint:
        raise ConfigError("distributed_type", f"the terms' joint modules ({', '.join(joint)}) train with the "
                          "denoiser's optimizer, which accelerate's FSDP maps onto the sharded denoiser only",
                          "use DDP (accelerate launch --multi_gpu) with these terms")
    params = [p for p in denoiser.parameters() if p.requires_grad]
    params += [p for module in joint.values() for p in module.parameters()]
    text_params = [p for module in text_encoders.values() for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(t.optimizer, optimizer_groups(config, params, text_params), t.learning_rate,
                               (t.adam_beta1, t.adam_beta2), t.adam_weight_decay, t.adam_epsilon, t)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps * accelerator.num_processes,
                              num_training_steps=t.max_train_steps * accelerator.num_processes)

    # Under FSDP accelerate prepares one model (the denoiser, sharded); the terms' own modules stay replicated
    # beside it (distributed.replicate_outside_fsdp) and their state goes into the project's checkpoint files
    # (safetensors) instead of accelerate's lists.
    saved = CheckpointState()
    own = {term.name: term.modules() for term in terms}
    to_prepare: list[Any] = [denoiser, optimizer, scheduler, *joint.values()]
    for term in terms:
        modules = own[term.name]
        for name, (module, opt, sched) in modules.items():
            if sharded:
                modules[name] = (replicate_outside_fsdp(accelerator, module), opt, sched)
                for suffix, obj in (("", module), ("_optimizer", opt), ("_scheduler", sched)):
                    saved.add(term.checkpoint_name(name, suffix), obj)
            else:
                to_prepare += [module, opt, sched]
    to_prepare += list(text_encoders.values())  # last: the checkpoint's earlier model files keep their numbers
    prepared = list(accelerator.prepare(*to_prepare, dataloader))
    denoiser, optimizer, scheduler = prepared[:3]
    joint = dict(zip(joint, prepared[3:3 + len(joint)]))
    rest = iter(prepared[3 + len(joint):-1 - len(text_encoders)])
    text_encoders = dict(zip(text_encoders, prepared[len(prepared) - 1 - len(text_encoders):-1]))
    for term in terms:
        modules = own[term.name]
        if not sharded:
            modules = {name: (next(rest), next(rest), next(rest)) for name in modules}
        term.bind(modules, {name.split(".", 1)[1]: m for name, m in joint.items() if name.startswith(term.name + ".")})
    if config.model.use_lora:  # checkpoints hold the LoRA, not the base
        lora.register_lora_checkpointing(accelerator, denoiser, *text_encoders.values())
    if text_encoders:
        # The adapter encodes captions through the prepared encoders (with grad); the loop trains them as it trains
        # the joint modules: in `accumulate`, in the denoiser's optimizer and grad-norm clipping, the replica check.
        adapter.trained_text_encoders = text_encoders
        joint.update(text_encoders)

    ema = None
    if t.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel([p for p in accelerator.unwrap_model(denoiser).parameters() if p.requires_grad], decay=t.ema_decay)
        ema.to(accelerator.device)
        saved.add("ema", ema)
    for term in terms:
        for name, obj in term.state().items():
            saved.add(f"{term.name}_{name}", obj)  # checkpoint names are [a-z0-9_]: sddit_teacher.safetensors

    use_vlb = getattr(adapter, "learned_sigma", False) and config.model.learned_sigma_loss == "vlb"
    run = Run(
        config=config, accelerator=accelerator, adapter=adapter, process=process, denoiser=denoiser,
        optimizer=optimizer, lr_scheduler=scheduler,
        diffusion_loss=process.diffusion_loss(t),
        vlb=LearnedSigmaVLB(process.betas, device=accelerator.device) if use_vlb else None,
        terms=terms, joint_modules=joint, ema=ema, weight_dtype=weight_dtype,
    )
    return run, prepared[-1], saved




def tracker_config(config: RunConfig) -> dict[str, Any]:
    # Trackers take scalars only: lists become strings, None becomes "none".
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.flat().items()}


def _quantized_note(config: RunConfig, denoiser) -> str:
    """`; base int8 (torchao, 12 quantized Linear layers)` for a quantized base (--quantize_base), else nothing."""
    if config.model.quantize_base == "none":
        return ""
    from ..tuners.quantization import backend_for, quantized_weights

    return (f"; base {config.model.quantize_base} ({backend_for(config.model)}, "
            f"{quantized_weights(denoiser)} quantized Linear layers)")


def _text_encoder_lines(config: RunConfig, adapter) -> list[str]:
    """The summary's line on the text encoders' LoRA (--train_text_encoder), else none."""
    encoders = getattr(adapter, "trained_text_encoders", None)
    if not encoders:
        return []
    trainable = sum(p.numel() for m in encoders.values() for p in m.parameters() if p.requires_grad)
    lr = config.training.text_encoder_lr or config.training.learning_rate
    return [f"text encoders: LoRA rank {config.model.text_encoder_lora_rank or config.model.lora_rank} on "
            f"{', '.join(encoders)}, {trainable / 1e6:.2f} M trainable, learning rate {lr}"]


def log_summary(accelerator, config, data, run: Run, resolution, global_batch) -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    denoiser = run.denoiser
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    lines = [
        f"data: {data.description}, {len(data)} samples, resolution {resolution}",
        f"steps: {config.training.max_train_steps}, effective batch "
        f"{global_batch * config.training.gradient_accumulation_steps} ({accelerator.num_processes} processes)",
        f"denoiser: {count(denoiser) / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M trainable"
        + (f" (LoRA rank {config.model.lora_rank})" if config.model.use_lora else "") + _quantized_note(config, denoiser),
        *_text_encoder_lines(config, run.adapter),
        f"precision: {accelerator.mixed_precision} (VAE in {str(run.adapter.vae.dtype).removeprefix('torch.')}), "
        f"device: {accelerator.device}",
    ]
    if config.family_defaults:  # what build_config filled in from the family's upstream script (docs/defaults.md)
        lines.append("family defaults (docs/defaults.md; set them to override): "
                     + ", ".join(f"{k} {v}" for k, v in config.family_defaults.items()))
    for name, section in config.term_sections.items():  # each term's lines, in registration order
        built = [term for term in run.terms if term.section == name]
        lines += [line for term in built for line in term.summary_lines(denoiser)] if section.enabled \
            else section.summary_off()
    lines += [line for term in run.terms if term.section not in config.term_sections  # built by hand (tests)
              for line in term.summary_lines(denoiser)]
    if accelerator.is_main_process:
        for line in lines:
            logger.info(line)
            accelerator.print(line)
