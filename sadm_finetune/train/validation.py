"""Sampling from the weights being trained: the stock pipeline around them (EMA weights swapped in when
on) and the fixed validation grid. Outside the training loop, which only calls `validate`."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .loop import Run


@contextlib.contextmanager
def inference_pipeline(run: Run, model=None) -> Iterator[Any]:
    """The stock pipeline around the current weights (EMA weights when on), in eval mode; the training
    weights are back in place afterwards. `model`: under FSDP, a gathered stock copy of the denoiser
    (distributed.gathered_copy) to use instead."""
    model = run.unwrapped_denoiser if model is None else model
    if run.ema is not None:
        run.ema.store(run.ema_parameters())
        run.ema.copy_to(run.ema_parameters())
    was_training = model.training
    model.eval()
    try:
        pipeline = run.adapter.export_pipeline(model)
        pipeline.set_progress_bar_config(disable=True)
        yield pipeline
    finally:
        model.train(was_training)
        if run.ema is not None:
            run.ema.restore(run.ema_parameters())


@contextlib.contextmanager
def vae_outside_autocast(vae) -> Iterator[None]:
    """Inside an autocast region, the VAE's `decode` runs in the VAE's own dtype (fp32 under fp16: models/vae.py)
    instead of autocast's half precision, in which SDXL's VAE overflows; the latents are cast to it."""
    original = vae.decode

    def decode(z: torch.Tensor, *args, **kwargs):
        with torch.autocast(device_type=z.device.type, enabled=False):
            return original(z.to(vae.dtype), *args, **kwargs)

    vae.decode = decode  # an instance attribute: the pipeline's `self.vae.decode(...)` finds it first
    try:
        yield
    finally:
        del vae.decode


def validate(run: Run, path, step: int, model=None) -> None:
    """Main process only: a fixed grid (fixed labels and seeds), saved and logged to the trackers."""
    from ..export.outputs import save_grid

    t, adapter = run.config.training, run.adapter
    # autocast: under mixed precision the frozen components sit in weight_dtype, the denoiser in fp32.
    with inference_pipeline(run, model) as pipeline, torch.no_grad(), run.accelerator.autocast(), \
            vae_outside_autocast(pipeline.vae):
        grid = adapter.sample_grid(pipeline, t.num_validation_images, t.validation_inference_steps,
                                   t.validation_guidance_scale, t.seed or 0, adapter.validation_conditions(t))
    save_grid(grid, path)
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            rows, cols = grid.shape[:2]
            tracker.writer.add_images("validation", grid.reshape(rows * cols, *grid.shape[2:]), step,
                                      dataformats="NHWC")
    del pipeline
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
