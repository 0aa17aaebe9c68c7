"""Narrow filters for third-party log lines that every run of this toolkit triggers and that tell its
users nothing. Each filter drops one message, on the one logger that emits it; everything else on those
loggers (and every other warning) still shows.

- transformers, on import: "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  `CLIPImageProcessorPil`" (and the same for SigLIP): diffusers' pipeline modules name these image
  processors, the toolkit never uses one (Stable Diffusion loads without its safety checker).
- diffusers, on every DiTPipeline load: "Expected types for id2label: (dict[int, str], ...), got
  Dict[str, str]": JSON keys are strings, so every saved DiT pipeline reloads with string keys.
- diffusers, on ``model.to(dtype)``: "There are modules in AutoencoderKL that should be kept in float32: []":
  only the empty-list form (nothing to keep), which is the case for every model this toolkit casts.

Global state kept on purpose (docs/design.md §12): all three messages are still emitted without these filters by
diffusers 0.42 and transformers 5.25 (checked on a tiny DiT load); drop a filter once its message is gone.
"""

from __future__ import annotations

import logging

DROPPED: dict[str, tuple[str, ...]] = {
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    "diffusers.pipelines.pipeline_utils": ("Expected types for id2label:",),
    "diffusers.models.modeling_utils": ("that should be kept in float32: []. ",),
}


class DropMessages(logging.Filter):
    """Drops records whose message contains one of ``fragments``."""

    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def silence_known_noise() -> None:
    """Install the filters (idempotent); call before importing diffusers / transformers."""
    for name, fragments in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(fragments))
