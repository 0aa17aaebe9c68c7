"""The project's checkpoint state without pickle: JSON / safetensors round trips, and pickled custom
states from elsewhere are refused before anything is unpickled."""

import json
import os

import pytest
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from sadm_finetune.checkpointing import CheckpointState, TrainState, load_checkpoint, save_checkpoint
from sadm_finetune.errors import InputError


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
    assert state2.state_dict() == state.state_dict()
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

    from sadm_finetune.models.discriminator import StructureDiscriminator

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
