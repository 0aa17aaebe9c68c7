"""In-process fixtures for the tests of sadm_finetune/train/: a run set up exactly as `entry.train` sets it up
(accelerator, tiny DiT adapter, frozen modules placed, data loader, `builders.build_run`), without the CLI, the
export or a subprocess, so that the loop and the builders can be driven and inspected directly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from launch import reset_accelerate_state
from tiny_options import tiny_options
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A 2-class tiny DiT (learned sigma) and 16 images (2 classes x 8): with batch 4, 4 batches an epoch."""
    tmp = tmp_path_factory.mktemp("train_tiny")
    return SimpleNamespace(base=build_tiny_dit_pipeline(tmp / "base", num_classes=2),
                           data=build_image_folder(tmp / "data", per_class=8))


@pytest.fixture
def make_run(tiny_base, tmp_path, monkeypatch):
    """make_run(**options) -> namespace(config, accelerator, adapter, data, run, dataloader, dataset, saved): every
    stage of entry.train up to the loop, in this process on the CPU. accelerate's singletons are reset around it."""
    from sadm_finetune.config.run import build_config
    from sadm_finetune.data.datasets import open_train_data
    from sadm_finetune.data.loader import build_train_dataloader
    from sadm_finetune.families.loading import load_family
    from sadm_finetune.train import builders, entry

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    reset_accelerate_state()

    def make(**overrides):
        config = build_config(tiny_options(tiny_base.base, tiny_base.data, tmp_path / "out", **overrides))
        if config.training.use_ema is None:
            config.training.use_ema = True  # what entry._check_distributed_type resolves outside FSDP
        accelerator = builders.make_accelerator(config, tmp_path / "out")
        adapter = load_family(config.model)
        resolution = config.data.resolution or adapter.default_resolution()
        adapter.set_resolution(resolution)
        adapter.prepare_training()
        data = open_train_data(config.data)
        weight_dtype = builders.weight_dtype_of(accelerator)
        entry.place_frozen_modules(adapter, accelerator.device, weight_dtype)
        dataset, dataloader = build_train_dataloader(config, accelerator, adapter, data, resolution)
        run, dataloader, saved = builders.build_run(config, accelerator, adapter, dataloader)
        return SimpleNamespace(config=config, accelerator=accelerator, adapter=adapter, data=data, run=run,
                               dataloader=dataloader, dataset=dataset, saved=saved, resolution=resolution)

    yield make
    reset_accelerate_state()
