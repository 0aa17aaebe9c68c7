"""Test-only launcher: the trainer under accelerate's FSDP on CPU processes (gloo).

accelerate 1.16 decides "several CPU processes" (MULTI_CPU) before it looks at FSDP
(`AcceleratorState.__init__` switches to FSDP only from a GPU-like distributed type), so on a CPU-only
machine `--use_fsdp` runs plain multi-CPU data parallelism. This launcher turns that state into FSDP
right after accelerate's own set-up (the process group is already up, over gloo) and runs the ordinary
CLI; everything else, FSDP2 wrapping, clipping, `get_state_dict`, `save_state`, is accelerate's
and torch's own FSDP code. Launch it like train_sadm.py:

    ACCELERATE_USE_CPU=1 accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2 ... tests/fsdp_cpu.py <flags>
"""

import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
_original_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Both shared states: every later AcceleratorState() re-copies PartialState's fields.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_fsdp_on_cpu

from sadm_finetune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
