"""Launcher: `accelerate launch train_sadm.py --pretrained ... --train_data_dir ...` (same flags as sadm-train)."""

import sys

import sadm_finetune.cpu_wait  # noqa: F401  (first: OMP_WAIT_POLICY=PASSIVE unless set, before torch loads)
from sadm_finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
