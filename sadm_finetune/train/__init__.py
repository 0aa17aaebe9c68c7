"""Training: the entry point, set-up (builders), the loop, checkpoints, distributed helpers, validation, the end of a run."""
