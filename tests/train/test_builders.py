"""train/builders.py: the accelerator, the trainable set (full, LoRA, DiffFit), the optimizers' parameter groups and
learning rates, EMA and the checkpoint names, the tracker config and the run summary's lines."""

from types import SimpleNamespace

import pytest
import torch

from sadm_finetune.train import builders


def trainable_names(run):
    return [n for n, p in run.unwrapped_denoiser.named_parameters() if p.requires_grad]


def optimizer_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def test_full_fine_tune_trains_every_weight_with_one_adamw_group_and_disc_its_own(make_run):
    r = make_run(learning_rate=2e-3, disc_learning_rate=5e-4, adam_weight_decay=0.03, adam_beta1=0.8,
                 adam_epsilon=1e-7, use_ema=True)
    run = r.run
    denoiser = run.unwrapped_denoiser
    assert all(p.requires_grad for p in denoiser.parameters()) and run.denoiser.training
    groups = run.optimizer.optimizer.param_groups
    assert isinstance(run.optimizer.optimizer, torch.optim.AdamW) and len(groups) == 1
    assert [id(p) for p in optimizer_params(run.optimizer)] == [id(p) for p in denoiser.parameters()]
    # get_scheduler's LambdaLR sets the group's lr to initial_lr x lambda(0): cosine with warm-up 0 starts at 1
    assert groups[0]["initial_lr"] == 2e-3 and groups[0]["weight_decay"] == 0.03
    assert groups[0]["betas"] == (0.8, 0.999) and groups[0]["eps"] == 1e-7
    sadm = next(term for term in run.terms if term.name == "sadm")
    disc_params = optimizer_params(sadm.optimizer)
    assert [id(p) for p in disc_params] == [id(p) for p in sadm.unwrapped_disc.parameters()]
    assert sadm.optimizer.optimizer.param_groups[0]["initial_lr"] == 5e-4
    assert not {id(p) for p in disc_params} & {id(p) for p in optimizer_params(run.optimizer)}
    assert run.ema is not None and len(run.ema.shadow_params) == len(list(denoiser.parameters()))
    assert run.vlb is not None  # the tiny DiT has learned sigma; learned_sigma_loss defaults to vlb
    # the project's checkpoint state: EMA and the loop counters' slot; accelerate saves the prepared D itself
    assert set(r.saved.objects) == {"ema"}


def test_lora_trains_only_the_adapters_and_the_frozen_base_stays(make_run):
    r = make_run(trainable="lora", lora_rank=2, use_ema=True, structure_weight=0.0)
    names = trainable_names(r.run)
    assert names and all("lora_" in n for n in names)
    assert [id(p) for p in optimizer_params(r.run.optimizer)] == [id(p) for p in r.run.ema_parameters()]
    assert len(r.run.ema.shadow_params) == len(names)
    shapes = {tuple(p.shape) for n, p in r.run.unwrapped_denoiser.named_parameters() if "lora_A" in n}
    assert all(shape[0] == 2 for shape in shapes)  # rank 2


def test_difffit_trains_biases_norms_and_scales_only(make_run):
    from sadm_finetune.tuners.difffit import SCALE_NAME

    r = make_run(trainable="difffit", structure_weight=0.0, use_ema=False)
    names = trainable_names(r.run)
    assert any(n.endswith(SCALE_NAME) for n in names) and any(n.endswith(".bias") for n in names)
    frozen = [n for n, p in r.run.unwrapped_denoiser.named_parameters() if not p.requires_grad]
    assert frozen and all(n.endswith(".weight") for n in frozen)
    assert len(optimizer_params(r.run.optimizer)) == len(names) and r.run.ema is None


def test_make_accelerator_takes_the_training_section():
    from accelerate import Accelerator

    from launch import reset_accelerate_state
    from sadm_finetune.config.run import RunConfig

    config = RunConfig()
    config.training.gradient_accumulation_steps = 3
    reset_accelerate_state()
    try:
        acc = builders.make_accelerator(config, __import__("pathlib").Path("/nonexistent/out"))
        assert isinstance(acc, Accelerator) and acc.gradient_accumulation_steps == 3
        assert acc.project_dir == "/nonexistent/out" and acc.logging_dir.endswith("/nonexistent/out/logs")
        assert acc.dataloader_config.use_seedable_sampler and [str(t) for t in acc.log_with] == ["tensorboard"]
        config.training.report_to = "none"
        reset_accelerate_state()
        assert builders.make_accelerator(config, __import__("pathlib").Path("/nonexistent/out")).log_with == []
    finally:
        reset_accelerate_state()


@pytest.mark.parametrize("precision, dtype", [("no", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_weight_dtype_of(precision, dtype):
    assert builders.weight_dtype_of(SimpleNamespace(mixed_precision=precision)) is dtype


def test_tracker_config_holds_scalars_only():
    from sadm_finetune.config.run import RunConfig

    config = RunConfig()
    config.training.validation_class_labels = [1, 2]
    values = builders.tracker_config(config)
    assert set(values) == set(config.flat())
    assert all(isinstance(v, (int, float, str, bool)) for v in values.values())
    assert values["validation_class_labels"] == "[1, 2]" and values["learning_rate"] == config.training.learning_rate


def summary_lines(r, capsys):
    capsys.readouterr()
    builders.log_summary(r.accelerator, r.config, r.data, r.run, r.resolution, 4)
    return capsys.readouterr().out.splitlines()


def test_the_run_summary_lines(make_run, capsys):
    r = make_run(trainable="lora", lora_rank=2, gradient_accumulation_steps=2, structure_weight=0.05)
    lines = summary_lines(r, capsys)
    total = sum(p.numel() for p in r.run.unwrapped_denoiser.parameters())
    trainable = sum(p.numel() for p in r.run.ema_parameters())
    disc = sum(p.numel() for p in next(t for t in r.run.terms if t.name == "sadm").unwrapped_disc.parameters())
    assert lines[0] == f"data: {r.data.description}, 16 samples, resolution 32"
    assert lines[1] == "steps: 2, effective batch 8 (1 processes)"
    assert lines[2] == f"denoiser: {total / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M trainable (LoRA rank 2)"
    assert lines[3] == "precision: no (VAE in float32), device: cpu"
    sadm = [ln for ln in lines if ln.startswith("SADM:")]
    assert sadm == [f"SADM: lambda 0.05, discriminator {disc / 1e6:.3f} M parameters "
                    f"({100 * disc / total:.1f}% of the denoiser; --disc_width / --disc_depth set its size)"]


def test_the_run_summary_of_a_plain_fine_tune(make_run, capsys):
    r = make_run(structure_weight=0.0)
    lines = summary_lines(r, capsys)
    assert "SADM: off (structure_weight 0): plain fine-tune" in lines
    assert not any(ln.startswith(("REPA:", "SD-DiT:")) for ln in lines)
    assert "(LoRA rank" not in lines[2]
