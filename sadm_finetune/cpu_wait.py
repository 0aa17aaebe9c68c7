"""Imported first by every command-line entry point (cli.py, evaluate.py, train_sadm.py), before torch loads:
OpenMP's idle threads sleep instead of spin-waiting (`OMP_WAIT_POLICY=PASSIVE`).

With the default (active) policy, torch's OpenMP threads spin for their next task; beside another process
that holds the cores they burn the time slices that process and their own peers need. Measured on a 2-core
machine (README, Performance: `benchmarks/busy_cpu.py`): sadm-eval took 553 s beside a training run of the
toolkit instead of 22 s idle, 39 s with the passive policy. libgomp reads the variable once, when torch
loads it, so this must run before `import torch`; a value the user set (even empty) is kept. Child
processes (accelerate's launched workers, data loader workers) inherit it.
"""

from __future__ import annotations

import os

VARIABLE = "OMP_WAIT_POLICY"
DEFAULT = "PASSIVE"

os.environ.setdefault(VARIABLE, DEFAULT)
