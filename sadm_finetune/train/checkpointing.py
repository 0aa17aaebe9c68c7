"""Resumable checkpoints through `accelerator.save_state`, written atomically and rotated.

The project's own state (loop counters, EMA, anything added to `CheckpointState`) is written beside
accelerate's files as JSON and safetensors, never pickled: resuming never unpickles a
`custom_checkpoint_*.pkl` (see docs/checkpoints.md for what accelerate itself still pickles).
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .distributed import any_rank
from ..utils.errors import InputError, SADMError, first_line
from ..utils.fsutil import move_into_place

_NAME = re.compile(r"^checkpoint-(\d+)$")


class TrainState:
    """Loop counters a checkpoint carries (in `train_state.json`, through `CheckpointState`)."""

    def __init__(self) -> None:
        self.global_step = 0  # denoiser updates done (skipped non-finite ones included)
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of `epoch` already consumed
        self.nonfinite_in_a_row = 0  # steps in a row with a hard failure of any update (the denoiser's or a term's)
        self.nonfinite_total = 0  # skipped denoiser updates
        self.term_nonfinite: dict[str, int] = {}  # skipped updates of a term's modules, by tracker tag

    def state_dict(self) -> dict[str, int]:
        state = {k: v for k, v in vars(self).items() if k != "term_nonfinite"}
        return {**state, **self.term_nonfinite}  # flat: nonfinite_discriminator_updates beside global_step

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.term_nonfinite = {}
        for key, value in state.items():
            if key.startswith("nonfinite_") and key.endswith("_updates"):
                self.term_nonfinite[key] = int(value)
            else:
                setattr(self, key, int(value))


_STATE_KEY = "sadm_state"  # safetensors metadata key holding the JSON skeleton of a state dict


def _flatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON skeleton of a nested state dict; its tensors go into `tensors` under generated names.

    Containers are tagged ({"d": [[key, v], ...]}, {"l": [...]}, {"t": [...]}) so int dict keys (optimizer
    state) and tuples (betas) come back as they were; scalars are {"v": x}, tensors {"T": name}."""
    if torch.is_tensor(value):
        name = str(len(tensors))
        tensors[name] = value.detach().to("cpu").contiguous()
        return {"T": name}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"checkpoint state: dict keys must be str or int, got {sorted(map(type, value))}")
        return {"d": [[k, _flatten(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"t" if isinstance(value, tuple) else "l": [_flatten(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"v": value}
    raise TypeError(f"checkpoint state: cannot store a {type(value).__name__} without pickle")


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"malformed checkpoint state node: {str(node)[:80]}")
    (tag, body), = node.items()
    if tag == "T":
        return tensors[body]
    if tag == "d":
        return {k: _unflatten(v, tensors) for k, v in body}
    if tag == "l":
        return [_unflatten(v, tensors) for v in body]
    if tag == "t":
        return tuple(_unflatten(v, tensors) for v in body)
    if tag == "v" and (body is None or isinstance(body, (bool, int, float, str))):
        return body
    raise ValueError(f"malformed checkpoint state node: {str(node)[:80]}")


def _is_flat(state: Any) -> bool:
    return isinstance(state, dict) and all(
        isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))) for k, v in state.items())


class CheckpointState:
    """The project's objects (anything with `state_dict`/`load_state_dict`) saved into a checkpoint
    folder without pickle: `<name>.json` (plain JSON) when the state is a flat dict of numbers and
    strings, else `<name>.safetensors` with the tensors and a JSON skeleton of the rest in its metadata.
    The objects must be identical on every rank (loop counters, EMA of DDP replicas, a replicated D);
    the main process writes them, every rank reads them."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}

    def add(self, name: str, obj: Any) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in self.objects:
            raise ValueError(f"checkpoint state name {name!r} must be new and lowercase")
        self.objects[name] = obj

    def save(self, folder: Path) -> None:
        for name, obj in self.objects.items():
            state = obj.state_dict()
            if _is_flat(state):
                (folder / f"{name}.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
                continue
            tensors: dict[str, torch.Tensor] = {}
            skeleton = json.dumps(_flatten(state, tensors), sort_keys=True)
            save_file(tensors, str(folder / f"{name}.safetensors"), metadata={_STATE_KEY: skeleton})

    def load(self, folder: Path, device: torch.device | str = "cpu") -> None:
        for name, obj in self.objects.items():
            json_file, tensor_file = folder / f"{name}.json", folder / f"{name}.safetensors"
            try:
                if tensor_file.is_file():
                    # safetensors takes "cpu", not an indexed "cpu:0" (accelerate's device for CPU processes)
                    where = "cpu" if torch.device(device).type == "cpu" else str(device)
                    with safe_open(str(tensor_file), framework="pt", device=where) as f:
                        skeleton = (f.metadata() or {}).get(_STATE_KEY)
                        tensors = {k: f.get_tensor(k) for k in f.keys()}
                    if skeleton is None:
                        raise ValueError("not written by sadm-finetune")
                    state = _unflatten(json.loads(skeleton), tensors)
                elif json_file.is_file():
                    state = json.loads(json_file.read_text())
                    if not _is_flat(state):
                        raise ValueError("not a flat JSON object")
                else:
                    raise InputError(f"resume_from_checkpoint: {folder} has no {name} state ({json_file.name} or "
                                     f"{tensor_file.name}); resume with the options of the run that wrote it")
                obj.load_state_dict(state)
            except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:  # JSONDecodeError: ValueError
                raise InputError(f"resume_from_checkpoint: the {name} state in {folder} is unreadable or does not fit "
                                 f"this run ({e})") from None


def load_checkpoint(accelerator: Accelerator, path: Path, state: CheckpointState) -> None:
    """accelerate's part (models as safetensors; optimizer, scheduler and RNG files through its
    `weights_only` loader) plus the project's JSON/safetensors part. A folder holding pickled custom
    states is refused before anything is read: they would be unpickled with `weights_only=False`."""
    pickled = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if pickled:
        raise InputError(
            f"resume_from_checkpoint: {path} holds pickled state ({', '.join(pickled)}), which is never loaded "
            "(unpickling can run code); it was written by an older sadm-finetune or another program. Start a new "
            "run, or use a checkpoint written by this version"
        )
    accelerator.load_state(str(path))
    state.load(path, accelerator.device)


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None  # nothing yet: a fresh start, as `latest` promises
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        path = checkpoints_dir(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        raise InputError(
            f"resume_from_checkpoint: {resume_from_checkpoint} not found; pass `latest` or a folder under "
            f"{checkpoints_dir(output_dir)}"
        )
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, total_limit: int | None,
                    state: CheckpointState | None = None) -> Path:
    """All ranks write into a temporary folder; the main process adds the project's `state`, renames
    the folder into place, then rotates.

    A crash mid-write leaves only a `.tmp-` folder, which `latest` never picks up. A write that fails (on
    any rank: the ranks agree on it instead of waiting at a barrier) removes the partial folder, leaves the
    earlier checkpoints as they were, and a full disk ends the run with one line (`disk_full_message`).
    """
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    failure = _attempt(lambda: accelerator.save_state(str(tmp)))
    if any_rank(failure is not None, accelerator.device):  # also the barrier after every rank's write
        _failed(accelerator, output_dir, tmp, final, state, failure)
    if accelerator.is_main_process:
        failure = _attempt(lambda: _finish_write(output_dir, tmp, final, total_limit, state))
    if any_rank(failure is not None, accelerator.device):
        _failed(accelerator, output_dir, tmp, final, state, failure)
    return final


def _finish_write(output_dir: str | Path, tmp: Path, final: Path, total_limit: int | None,
                  state: CheckpointState | None) -> None:
    if state is not None:
        state.save(tmp)
    move_into_place(tmp, final)  # the same step saved again (e.g. a resumed run) is replaced
    if total_limit is not None:
        for stale in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(stale)


def _attempt(write) -> BaseException | None:
    try:
        write()
    except Exception as e:  # noqa: BLE001 (handled by _failed on every rank)
        return e
    return None


# What a full disk looks like from each writer: OSError from Python's own writes (JSON), torch.save's
# "[enforce fail at inline_container.cc:...] . unexpected pos ..." / "PytorchStreamWriter failed writing
# file ...", and safetensors' "IoError(Os { code: 28, kind: StorageFull, ... })".
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXT = ("unexpected pos", "PytorchStreamWriter failed", "No space left on device", "StorageFull",
                   "Disk quota exceeded", "code: 28,")


def is_disk_full(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(seen) for text in _DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _failed(accelerator: Accelerator, output_dir: str | Path, tmp: Path, final: Path,
            state: CheckpointState | None, failure: BaseException | None) -> None:
    """Every rank: the partial folder goes (main process), then this rank's error, one line for a full disk."""
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    if failure is None:
        raise SADMError(f"checkpoint: another process failed to write {final.name} (its error is above); "
                        f"{tmp.name} was removed, the earlier checkpoints are intact")
    if is_disk_full(failure):
        raise SADMError(disk_full_message(accelerator, output_dir, final, state, failure)) from None
    raise failure


def disk_full_message(accelerator: Accelerator, output_dir: str | Path, final: Path, state: CheckpointState | None,
                      failure: BaseException) -> str:
    root = checkpoints_dir(output_dir)
    earlier = list_checkpoints(output_dir)
    if earlier:
        need = f"about {_human(folder_bytes(earlier[-1]))} (the size of {earlier[-1].name})"
        kept = f"the earlier checkpoints are intact (latest {earlier[-1].name}: --resume_from_checkpoint latest)"
    else:
        need = f"about {_human(estimate_checkpoint_bytes(accelerator, state))} (estimated from the weights and " \
               "optimizer state it holds)"
        kept = "no earlier checkpoint exists"
    try:
        free = f"{_human(shutil.disk_usage(root).free)} free"
    except OSError:
        free = "free space unknown"
    return (f"checkpoint: the disk is full: writing {final.name} into {root} failed ({first_line(failure)}; "
            f"{free}); a checkpoint needs {need}. The partial {final.name} was removed and {kept}; free space, "
            "keep fewer checkpoints with --checkpoints_total_limit N, or pass another --output_dir")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _tensor_bytes(value: Any) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def estimate_checkpoint_bytes(accelerator: Accelerator, state: CheckpointState | None) -> int:
    """What `save_checkpoint` writes, from the tensors in memory: the prepared models' trainable weights (a LoRA
    checkpoint holds only the adapters), every optimizer's state, and the project's own state (EMA, ...)."""
    total = sum(_tensor_bytes([p for p in model.parameters() if p.requires_grad]) for model in accelerator._models)
    total += sum(_tensor_bytes(optimizer.state_dict()["state"]) for optimizer in accelerator._optimizers)
    if state is not None:
        total += sum(_tensor_bytes(obj.state_dict()) for obj in state.objects.values())
    return total


def _human(num_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"
