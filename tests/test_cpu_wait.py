"""Every command-line entry point sets OMP_WAIT_POLICY=PASSIVE before torch loads (OpenMP threads sleep
instead of spin-waiting beside other processes), unless the user's environment already set it.

Each entry runs in a fresh interpreter with a probe on the import system that records the variable at the
moment `torch` is first imported, then ends the process there (nothing heavy runs)."""

import os
import subprocess
import sys

import pytest

from launch import ROOT

PROBE = r"""
import importlib, importlib.abc, os, runpy, sys

class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("AT_TORCH_IMPORT=" + repr(os.environ.get("OMP_WAIT_POLICY")), flush=True)
            os._exit(0)
        return None

sys.meta_path.insert(0, Probe())
kind, target, *args = sys.argv[1:]
if kind == "script":  # python train_sadm.py ...: what accelerate launch runs in its child process
    sys.argv = [target, *args]
    runpy.run_path(target, run_name="__main__")
elif kind == "module":  # python -m sadm_finetune.evaluation.evaluate ...
    sys.argv = [target, *args]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:  # a console script (setup.cfg): from MODULE import FUNCTION; sys.exit(FUNCTION())
    module, function = target.split(":")
    sys.argv = [kind, *args]
    sys.exit(getattr(importlib.import_module(module), function)())
print("TORCH_NEVER_IMPORTED", flush=True)
"""

TRAIN_ARGS = ["--pretrained", "missing-base", "--train_data_dir", "missing-data", "--output_dir", "missing-out"]
EVAL_ARGS = ["--pipeline", "missing-pipeline", "--reference_dataset", "builtin:digits"]
ENTRIES = {
    "train_sadm.py": ("script", str(ROOT / "train_sadm.py"), TRAIN_ARGS),
    "sadm-train": ("sadm-train", "sadm_finetune.cli:main", TRAIN_ARGS),
    "sadm-eval": ("sadm-eval", "sadm_finetune.evaluation.evaluate:main", EVAL_ARGS),
    "python -m sadm_finetune.evaluation.evaluate": ("module", "sadm_finetune.evaluation.evaluate", EVAL_ARGS),
}


def _policy_at_torch_import(entry, user_value):
    kind, target, args = ENTRIES[entry]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user_value is not None:
        env["OMP_WAIT_POLICY"] = user_value
    proc = subprocess.run([sys.executable, "-c", PROBE, kind, target, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    found = [line for line in proc.stdout.splitlines() if line.startswith("AT_TORCH_IMPORT=")]
    assert proc.returncode == 0 and len(found) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    return found[0].split("=", 1)[1]


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_entry_points_set_a_passive_wait_policy_before_torch_loads(entry):
    assert _policy_at_torch_import(entry, None) == "'PASSIVE'"


@pytest.mark.parametrize("entry", ["train_sadm.py", "sadm-eval"])
def test_the_users_own_value_wins(entry):
    assert _policy_at_torch_import(entry, "ACTIVE") == "'ACTIVE'"
