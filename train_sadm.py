"""Launcher: `accelerate launch train_sadm.py --pretrained ... --train_data_dir ...` (same flags as sadm-train)."""

import sys

from sadm_finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
