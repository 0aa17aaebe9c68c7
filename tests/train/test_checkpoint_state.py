"""The project's checkpoint state without pickle: JSON / safetensors round trips, and pickled custom
states from elsewhere are refused before anything is unpickled."""

import json
import os

import pytest
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from sadm_finetune.train.checkpointing import CheckpointState, TrainState, load_checkpoint, save_checkpoint
from sadm_finetune.utils.errors import InputError


def _trained_objects(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.5, 0.9))
    ema = EMAModel(list(model.parameters()), decay=0.9)
    state = TrainState()
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        ema.step(model.parameters())
        state.global_step += 1
    state.epoch, state.batches_in_epoch, state.nonfinite_total = 2, 1, 4
    state.term_nonfinite = {"nonfinite_discriminator_updates": 3}  # a term's skipped updates survive a resume
    return model, optimizer, ema, state


def test_state_round_trips_exactly_without_pickle(tmp_path):
    _, optimizer, ema, state = _trained_objects(0)
    saved = CheckpointState()
    saved.add("train_state", state)
    saved.add("ema", ema)
    saved.add("optimizer", optimizer)
    saved.save(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["ema.safetensors", "optimizer.safetensors", "train_state.json"]
    assert json.loads((tmp_path / "train_state.json").read_text()) == state.state_dict()  # plain JSON

    _, optimizer2, ema2, state2 = _trained_objects(1)  # different values everywhere
    loaded = CheckpointState()
    loaded.add("train_state", state2)
    loaded.add("ema", ema2)
    loaded.add("optimizer", optimizer2)
    loaded.load(tmp_path)
    assert state2.state_dict() == state.state_dict() and state2.term_nonfinite == {"nonfinite_discriminator_updates": 3}
    a, b = ema.state_dict(), ema2.state_dict()
    assert {k: v for k, v in a.items() if k != "shadow_params"} == {k: v for k, v in b.items() if k != "shadow_params"}
    # A storage round trip: bit for bit.
    assert all(torch.equal(x, y) for x, y in zip(a["shadow_params"], b["shadow_params"], strict=True))
    o, o2 = optimizer.state_dict(), optimizer2.state_dict()
    assert o["param_groups"] == o2["param_groups"] and o2["param_groups"][0]["betas"] == (0.5, 0.9)
    assert o["state"].keys() == o2["state"].keys()
    assert all(torch.equal(o["state"][i][k], o2["state"][i][k]) for i in o["state"] for k in o["state"][i])


def test_an_unprepared_discriminator_with_optimizer_and_scheduler_round_trips(tmp_path):
    """Under FSDP, D, its optimizer and scheduler are not accelerate's: they go through CheckpointState."""
    from diffusers.optimization import get_scheduler

    from sadm_finetune.terms.sadm.discriminator import StructureDiscriminator

    def build(seed):
        torch.manual_seed(seed)
        disc = StructureDiscriminator(in_channels=4, base_channels=8, num_blocks=2, embed_dim=16, spectral_norm=True)
        opt = torch.optim.AdamW(disc.parameters(), lr=1e-3, betas=(0.5, 0.999))
        sched = get_scheduler("constant", opt)
        disc(torch.randn(3, 4, 8, 8), torch.randint(0, 1000, (3,))).sum().backward()
        opt.step()
        sched.step()
        return {"discriminator": disc, "disc_optimizer": opt, "disc_scheduler": sched}

    objs, other = build(0), build(1)
    saved, loaded = CheckpointState(), CheckpointState()
    for name in objs:
        saved.add(name, objs[name])
        loaded.add(name, other[name])
    saved.save(tmp_path)
    loaded.load(tmp_path)
    a, b = objs["discriminator"].state_dict(), other["discriminator"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert objs["disc_scheduler"].state_dict() == other["disc_scheduler"].state_dict()
    o, o2 = objs["disc_optimizer"].state_dict(), other["disc_optimizer"].state_dict()
    assert o["param_groups"] == o2["param_groups"]
    assert all(torch.equal(o["state"][i][k], o2["state"][i][k]) for i in o["state"] for k in o["state"][i])
    assert not list(tmp_path.glob("*.pkl"))


def test_a_missing_part_is_a_clear_error(tmp_path):
    saved = CheckpointState()
    saved.add("train_state", TrainState())
    with pytest.raises(InputError, match="has no train_state state"):
        saved.load(tmp_path)
    (tmp_path / "train_state.json").write_text('{"global_step": {"nested": 1}}')
    with pytest.raises(InputError, match="train_state state in .* is unreadable"):
        saved.load(tmp_path)
    (tmp_path / "train_state.json").unlink()
    (tmp_path / "train_state.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="train_state state in .* is unreadable"):
        saved.load(tmp_path)


class _RunsCode:
    """Unpickling this creates a file: what a hostile checkpoint could do with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickled_custom_state_is_refused_before_it_is_unpickled(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    saved = CheckpointState()
    saved.add("train_state", TrainState())
    path = save_checkpoint(accelerator, tmp_path, 1, None, saved)
    assert not list(path.glob("*.pkl")) or {p.name for p in path.glob("*.pkl")} == {"random_states_0.pkl"}
    marker = tmp_path / "code-ran"
    torch.save({"payload": _RunsCode(marker)}, path / "custom_checkpoint_0.pkl")

    with pytest.raises(InputError, match="holds pickled state .*custom_checkpoint_0.pkl.* never loaded"):
        load_checkpoint(accelerator, path, saved)
    assert not marker.exists()
    # The same folder without the foreign file loads.
    (path / "custom_checkpoint_0.pkl").unlink()
    load_checkpoint(accelerator, path, saved)
    assert model.weight.shape == (2, 2)


# -- a disk that fills while a checkpoint is written ---------------------------------------------------------

DISK_FULL = {  # what each writer raises when the disk fills (torch.save's two forms, Python's own writes)
    "torch-unexpected-pos": lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1152 vs "
                                                 "1040"),
    "torch-stream-writer": lambda: RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    "enospc": lambda: OSError(28, "No space left on device"),
}


@pytest.fixture
def prepared(tmp_path):
    """A prepared model and optimizer (one step taken), the project's state, and a first good checkpoint."""
    from launch import reset_accelerate_state

    reset_accelerate_state()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(3, 16)).pow(2).mean().backward()
    optimizer.step()
    saved = CheckpointState()
    saved.add("train_state", TrainState())
    saved.add("ema", EMAModel(list(model.parameters()), decay=0.9))
    first = save_checkpoint(accelerator, tmp_path, 1, None, saved)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    yield accelerator, model, saved, first, weights
    reset_accelerate_state()


def _partial_write(path, error):
    """A save that dies mid-write: part of a file is on disk when the error comes."""
    def write(*args, **kwargs):
        path().parent.mkdir(parents=True, exist_ok=True)
        path().write_bytes(b"\0" * 4096)
        raise error()
    return write


@pytest.mark.parametrize("error", list(DISK_FULL), ids=list(DISK_FULL))
def test_a_full_disk_mid_checkpoint_is_one_line_and_leaves_the_earlier_checkpoint_loadable(prepared, tmp_path,
                                                                                           monkeypatch, error):
    from sadm_finetune.train.checkpointing import folder_bytes, list_checkpoints
    from sadm_finetune.utils.errors import SADMError

    accelerator, model, saved, first, weights = prepared
    partial = tmp_path / "checkpoints" / ".tmp-checkpoint-2"
    monkeypatch.setattr(accelerator, "save_state", _partial_write(lambda: partial / "optimizer.bin", DISK_FULL[error]))
    with pytest.raises(SADMError) as raised:
        save_checkpoint(accelerator, tmp_path, 2, None, saved)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("checkpoint: the disk is full: writing checkpoint-2 into "
                                                       f"{tmp_path / 'checkpoints'} failed")
    size = folder_bytes(first) / 1024
    assert f"a checkpoint needs about {size:.1f} KiB (the size of checkpoint-1)" in message
    assert "--checkpoints_total_limit" in message and "--output_dir" in message and "free" in message
    assert not partial.exists()  # the partial write no longer takes space
    assert list_checkpoints(tmp_path) == [first]

    with torch.no_grad():  # ... and the earlier checkpoint still resumes
        for p in model.parameters():
            p.add_(1.0)
    load_checkpoint(accelerator, first, saved)
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)


def test_a_full_disk_while_writing_the_projects_state_and_without_an_earlier_checkpoint(prepared, tmp_path,
                                                                                        monkeypatch):
    """safetensors' form of the error, from the project's own state files; with no checkpoint to measure, the size
    is estimated from the tensors the checkpoint holds."""
    import shutil

    from safetensors import SafetensorError

    import sadm_finetune.train.checkpointing as checkpointing
    from sadm_finetune.train.checkpointing import estimate_checkpoint_bytes, list_checkpoints
    from sadm_finetune.utils.errors import SADMError

    accelerator, _, saved, first, _ = prepared
    shutil.rmtree(first)
    partial = tmp_path / "checkpoints" / ".tmp-checkpoint-2"
    storage_full = lambda: SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '  # noqa: E731
                                           'message: "No space left on device" })')
    monkeypatch.setattr(checkpointing, "save_file", _partial_write(lambda: partial / "ema.safetensors", storage_full))
    with pytest.raises(SADMError) as raised:
        save_checkpoint(accelerator, tmp_path, 2, None, saved)
    message = str(raised.value)
    # model (16*32+32+32*4+4 = 676 fp32 weights), AdamW's two moments of each, the EMA's copy: about 4 x 676 x 4 B
    estimate = estimate_checkpoint_bytes(accelerator, saved)
    assert 4 * 676 * 4 <= estimate <= 4 * 676 * 4 + 256
    assert f"needs about {estimate / 1024:.1f} KiB (estimated from the weights and optimizer state" in message
    assert "StorageFull" in message and "no earlier checkpoint exists" in message
    assert not partial.exists() and list_checkpoints(tmp_path) == []


def test_any_other_write_error_still_removes_the_partial_folder_and_propagates(prepared, tmp_path, monkeypatch):
    accelerator, _, saved, first, _ = prepared
    partial = tmp_path / "checkpoints" / ".tmp-checkpoint-2"
    monkeypatch.setattr(accelerator, "save_state",
                        _partial_write(lambda: partial / "model.safetensors", lambda: PermissionError(13, "denied")))
    with pytest.raises(PermissionError):
        save_checkpoint(accelerator, tmp_path, 2, None, saved)
    assert not partial.exists() and first.is_dir()
