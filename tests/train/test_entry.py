"""train/entry.py: every check on the options and the data runs before any weights load (a stand-in for
`load_family` fails the test if reached), the sharded set-ups refused, the per-update hook (non-finite guard,
checkpoint and validation cadence), the frozen modules' placement, and one short `train()` in this process."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from launch import reset_accelerate_state
from sadm_finetune.config.run import build_config
from sadm_finetune.train import entry
from sadm_finetune.utils.errors import ConfigError, InputError, SADMError
from tiny_options import tiny_options


class WeightsLoaded(Exception):
    pass


@pytest.fixture
def no_weights(monkeypatch):
    """entry.load_family replaced: reaching it raises WeightsLoaded."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")

    def load_family(config, *args, **kwargs):
        raise WeightsLoaded(config.pretrained_model_name_or_path)

    monkeypatch.setattr(entry, "load_family", load_family)
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def options(tiny_base, tmp_path, **overrides):
    return tiny_options(tiny_base.base, tiny_base.data, tmp_path / "out", **overrides)


@pytest.mark.parametrize("overrides, error, field", [
    ({"cache_text_embeddings": True}, ConfigError, "cache_text_embeddings"),  # the family's check_config
    ({"weighting_scheme": "logit_normal"}, ConfigError, "weighting_scheme"),  # the family's process options
    ({"instance_prompt": "a photo of sks"}, ConfigError, "instance_prompt"),  # personalization on a DiT
    ({"train_data_dir": "MISSING"}, InputError, "train_data_dir"),  # the data source, opened cheaply
    ({"mixed_precision": "fp16"}, ConfigError, "mixed_precision"),  # fp16 without autocast on a CPU
])
def test_a_bad_option_fails_before_any_weights_load(tiny_base, tmp_path, no_weights, overrides, error, field):
    if overrides.get("train_data_dir") == "MISSING":
        overrides = {"train_data_dir": str(tmp_path / "no_such_folder")}
    config = build_config(options(tiny_base, tmp_path, **overrides))
    with pytest.raises(error) as info:
        entry.train(config)
    assert str(info.value).startswith(f"{field}:") and len(str(info.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_non_empty_output_dir_fails_before_any_weights_load(tiny_base, tmp_path, no_weights):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"^output_dir: .* exists and is not empty"):
        entry.train(build_config(options(tiny_base, tmp_path)))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def test_a_good_config_reaches_the_weights(tiny_base, tmp_path, no_weights):
    """The control of the tests above: the stand-in is what stops a good config."""
    with pytest.raises(WeightsLoaded):
        entry.train(build_config(options(tiny_base, tmp_path)))


def test_a_batch_larger_than_the_data_fails_before_the_data_loader(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setattr(entry, "build_train_dataloader", lambda *a, **k: pytest.fail("the data loader was built"))
    reset_accelerate_state()
    try:
        with pytest.raises(ConfigError, match=r"^train_batch_size: the data set has 16 samples, fewer than one "
                                              r"global batch \(32\)"):
            entry.train(build_config(options(tiny_base, tmp_path, train_batch_size=32)))
    finally:
        reset_accelerate_state()


def fake_accelerator(kind, mixed_precision="no"):
    printed = []
    return SimpleNamespace(distributed_type=kind, mixed_precision=mixed_precision, print=printed.append,
                           printed=printed)


@pytest.mark.parametrize("overrides, kind, precision, field", [
    ({"trainable": "lora"}, DistributedType.FSDP, "no", "trainable"),
    ({"use_ema": True}, DistributedType.FSDP, "no", "use_ema"),
    ({}, DistributedType.FSDP, "fp16", "mixed_precision"),  # SADM's replicated D has no scaler
    ({}, DistributedType.DEEPSPEED, "no", "structure_weight"),
])
def test_sharded_set_ups_that_are_refused(tiny_base, tmp_path, overrides, kind, precision, field):
    config = build_config(options(tiny_base, tmp_path, **overrides))
    with pytest.raises(ConfigError, match=f"^{field}:"):
        entry._check_distributed_type(config, fake_accelerator(kind, precision))


def test_ema_defaults_on_except_under_fsdp(tiny_base, tmp_path):
    for kind, expected in ((DistributedType.NO, True), (DistributedType.MULTI_GPU, True), (DistributedType.FSDP, False)):
        config = build_config(options(tiny_base, tmp_path, structure_weight=0.0))
        assert config.training.use_ema is None
        acc = fake_accelerator(kind)
        entry._check_distributed_type(config, acc)
        assert config.training.use_ema is expected
        assert acc.printed == ([] if expected else ["EMA: off under FSDP (the default is on elsewhere; FSDP cannot "
                                                    "gather it)"])
    config = build_config(options(tiny_base, tmp_path, structure_weight=0.0, use_ema=False))
    entry._check_distributed_type(config, fake_accelerator(DistributedType.DEEPSPEED))  # plain runs pass
    assert config.training.use_ema is False


def hook_run(tiny_base, tmp_path, **overrides):
    config = build_config(options(tiny_base, tmp_path, **overrides))
    acc = SimpleNamespace(distributed_type=DistributedType.NO, is_main_process=True, wait_for_everyone=lambda: None)
    return SimpleNamespace(config=config, accelerator=acc)


def test_the_update_hook_checkpoints_and_validates_on_their_cadence(tiny_base, tmp_path, monkeypatch):
    from sadm_finetune.train.checkpointing import TrainState

    saved, sampled = [], []
    monkeypatch.setattr(entry, "save_checkpoint", lambda acc, out, step, limit, state: saved.append((step, limit)))
    monkeypatch.setattr(entry, "validate", lambda run, path, step, model: sampled.append((path, step, model)))
    run = hook_run(tiny_base, tmp_path, checkpointing_steps=2, checkpoints_total_limit=3, validation_steps=3)
    state = TrainState()
    for step in range(1, 7):
        state.global_step = step
        entry._on_update(run, state, None, tmp_path / "out")
    assert saved == [(2, 3), (4, 3), (6, 3)]
    assert sampled == [(tmp_path / "out" / "samples" / f"step-{s}.png", s, None) for s in (3, 6)]


def test_the_non_finite_guard_stops_with_the_counts_and_the_last_checkpoint(tiny_base, tmp_path, monkeypatch):
    from sadm_finetune.train.checkpointing import TrainState

    monkeypatch.setattr(entry, "save_checkpoint", lambda *a: pytest.fail("checkpointed after the guard"))
    run = hook_run(tiny_base, tmp_path, max_nonfinite_steps=2, checkpointing_steps=1)
    state = TrainState()
    state.global_step, state.nonfinite_in_a_row, state.nonfinite_total = 7, 1, 3
    state.term_nonfinite = {"nonfinite_discriminator_updates": 4}
    monkeypatch.setattr(entry, "save_checkpoint", lambda *a: None)
    entry._on_update(run, state, None, tmp_path / "out")  # 1 in a row < 2: carries on
    monkeypatch.setattr(entry, "save_checkpoint", lambda *a: pytest.fail("checkpointed after the guard"))
    (tmp_path / "out" / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    state.nonfinite_in_a_row = 2
    with pytest.raises(SADMError) as info:
        entry._on_update(run, state, None, tmp_path / "out")
    message = str(info.value)
    assert message.startswith("max_nonfinite_steps: 2 updates in a row had a non-finite loss or gradient (step 7; "
                              "skipped so far: nonfinite_updates 3, nonfinite_discriminator_updates 4); the last "
                              "good checkpoint is ")
    assert "checkpoint-5" in message


def test_place_frozen_modules():
    vae, encoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    adapter = SimpleNamespace(frozen_modules=lambda: [vae, encoder],
                              frozen_dtype=lambda m, dtype: torch.float32 if m is vae else dtype)
    entry.place_frozen_modules(adapter, torch.device("cpu"), torch.bfloat16)
    for module, dtype in ((vae, torch.float32), (encoder, torch.bfloat16)):
        assert not module.training and all(not p.requires_grad and p.dtype == dtype for p in module.parameters())


def test_train_runs_one_update_and_exports(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    reset_accelerate_state()
    try:
        summary = entry.train(build_config(options(tiny_base, tmp_path, max_train_steps=1, num_validation_images=1,
                                                   validation_inference_steps=1, structure_weight=0.0)), argv=[])
    finally:
        reset_accelerate_state()
    out = tmp_path / "out"
    assert summary == entry.RunSummary(out, 1, False)
    assert (out / "model_index.json").is_file() and (out / "training_config.yaml").is_file()
    assert not (out / ".sadm_run_started").exists()  # the start marker is gone after a finished run
