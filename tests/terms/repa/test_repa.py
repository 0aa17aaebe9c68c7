"""REPA (terms/repa.py, terms/repa_cache.py): the loss, the frozen encoder, the feature cache, runs end to end.

Tiny random DINOv2 encoders built in code and saved to a temp folder; never the network."""

import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from launch import tiny_run_args, train_in_process
from sadm_finetune.utils.errors import ConfigError, InputError
from sadm_finetune.terms.repa.term import (FEATURES_KEY, RepaTerm, VisionEncoder, denoiser_tokens, match_grid,
                                      repa_loss)
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline
from tiny_encoders import build_tiny_encoder, repa_args


# -- the loss on hand-made tensors ------------------------------------------------------------------------
def test_loss_is_minus_the_mean_patchwise_cosine_per_sample():
    torch.manual_seed(0)
    projected, target = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    loss, cosine = repa_loss(projected, target)
    for b in range(2):
        expected = sum((projected[b, n] @ target[b, n]) / (projected[b, n].norm() * target[b, n].norm())
                       for n in range(5)) / 5
        assert loss[b].item() == pytest.approx(-expected.item(), abs=1e-6)
        assert cosine[b].item() == pytest.approx(expected.item(), abs=1e-6)
    # Aligned tokens (any positive scale) give the minimum, -1.
    assert torch.allclose(repa_loss(target * 3.0, target)[0], torch.full((2,), -1.0), atol=1e-6)


def test_grids_are_matched_by_bilinear_interpolation_in_token_order():
    # A 1x2 grid [0, 1] on a 1x4 grid, bilinear with half-pixel centres: [0, 0.25, 0.75, 1].
    features = torch.tensor([[[[0.0, 1.0]]]])  # (B=1, E=1, 1, 2)
    assert match_grid(features, (1, 4)).flatten().tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])
    # Same grid: unchanged, tokens row-major as the denoiser's patches are, fp32.
    grid = torch.arange(6.0).view(1, 1, 2, 3).half()
    tokens = match_grid(grid, (2, 3))
    assert tokens.dtype == torch.float32 and tokens.flatten().tolist() == list(range(6))
    # A 2x2 grid on 4x4: each output token is the interpolation at its own position (2-D, not per axis order).
    features = torch.randn(1, 3, 2, 2)
    out = match_grid(features, (4, 4)).view(1, 4, 4, 3)
    assert torch.allclose(out[0, 0, 0], features[0, :, 0, 0])  # corners clamp to the corner features
    assert torch.allclose(out[0, 1, 2], features[0, :, 0, 0] * 0.75 * 0.25 + features[0, :, 0, 1] * 0.75 * 0.75
                          + features[0, :, 1, 0] * 0.25 * 0.25 + features[0, :, 1, 1] * 0.25 * 0.75, atol=1e-6)


def test_denoiser_tokens_and_grids_of_transformers_and_unets():
    dit = torch.randn(2, 16, 32)  # 8x8 latents in 2x2 patches
    tokens, grid = denoiser_tokens(dit, (8, 8))
    assert grid == (4, 4) and tokens is dit
    assert denoiser_tokens(torch.randn(2, 8, 32), (8, 16))[1] == (2, 4)  # a non-square bucket
    unet = torch.randn(2, 5, 3, 4)
    tokens, grid = denoiser_tokens(unet, (24, 32))
    assert grid == (3, 4) and tokens.shape == (2, 12, 5)
    assert torch.equal(tokens[1, 4 + 2], unet[1, :, 1, 2])  # row-major


# -- the frozen encoder -----------------------------------------------------------------------------------
def test_encoder_features_drop_cls_and_registers_and_use_the_processor_normalisation(tmp_path):
    from transformers import AutoModel

    mean, std = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
    path = build_tiny_encoder(tmp_path / "enc", registers=2, mean=mean, std=std)
    encoder = VisionEncoder.from_pretrained(str(path), 42, torch.device("cpu"), torch.float32)
    assert not any(p.requires_grad for p in encoder.model.parameters()) and not encoder.model.training
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    features = encoder(pixels)
    assert features.shape == (2, 16, 6, 6)

    model = AutoModel.from_pretrained(path).eval()
    x = F.interpolate((pixels + 1) / 2, size=(42, 42), mode="bicubic", align_corners=False)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state[:, 1 + 2:]  # DINOv2: CLS, then the registers
    assert torch.allclose(features, tokens.transpose(1, 2).reshape(2, 16, 6, 6), atol=1e-5)

    plain = VisionEncoder.from_pretrained(str(build_tiny_encoder(tmp_path / "plain")), 28, torch.device("cpu"),
                                          torch.bfloat16)
    assert plain.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # no processor config: ImageNet's
    assert plain.dtype == torch.bfloat16 and plain(pixels).shape == (2, 16, 4, 4)


def test_projector_width_matches_every_feature_block_of_a_unet():
    from diffusers import UNet2DConditionModel

    from sadm_finetune.families.sd import StableDiffusionAdapter
    from sadm_finetune.terms.repa.term import feature_width

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    adapter = StableDiffusionAdapter.__new__(StableDiffusionAdapter)  # only its block list is used here
    blocks = adapter.feature_blocks(unet)
    with torch.no_grad(), adapter.capture_hidden(unet, tuple(range(len(blocks)))) as hidden:
        unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), encoder_hidden_states=torch.randn(2, 3, 32))
    assert len(hidden) == len(blocks) == 5
    for index, states in hidden.items():
        tokens, grid = denoiser_tokens(states, (8, 8))
        assert feature_width(unet, index) == tokens.shape[-1] == states.shape[1], index
        assert tokens.shape[1] == grid[0] * grid[1]


# -- one-line errors before heavy work ---------------------------------------------------------------------
class _Accelerator:
    def __init__(self, kind="NO"):
        self.distributed_type = kind  # DistributedType is a str enum: its value compares equal


def _config(tmp_path, *extra):
    from sadm_finetune.cli import parse_config

    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    config, _ = parse_config(tiny_run_args(base, tmp_path / "data", tmp_path / "out") + list(extra))
    return config


def test_config_checks_name_the_field_and_the_fix(tmp_path):
    from transformers import BertConfig, BertModel

    from sadm_finetune.families.loading import load_family
    from sadm_finetune.terms import check_terms

    encoder = build_tiny_encoder(tmp_path / "enc")
    config = _config(tmp_path, *repa_args(encoder, depth=2))
    adapter = load_family(config.model)  # a 1-block DiT
    with pytest.raises(ConfigError, match=r"^repa_depth: is 2, but the denoiser has 1 feature blocks; pass "
                                          r"--repa_depth between 1 and 1$"):
        check_terms(config, adapter, _Accelerator())

    config.repa.repa_depth = 1
    check_terms(config, adapter, _Accelerator())
    with pytest.raises(ConfigError, match=r"^repa_weight: REPA's projector trains with the denoiser's optimizer.*"
                                          r"use DDP \(accelerate launch --multi_gpu\), or --repa_weight 0$"):
        check_terms(config, adapter, _Accelerator("FSDP"))

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50)).save_pretrained(tmp_path / "bert")
    config.repa.repa_encoder = str(tmp_path / "bert")
    with pytest.raises(ConfigError, match=r"^repa_encoder: .* is a bert model, not a vision transformer"):
        check_terms(config, adapter, _Accelerator())
    config.repa.repa_encoder = str(tmp_path / "missing")
    with pytest.raises(InputError, match=r"^repa_encoder: folder .*missing not found; pass"):
        check_terms(config, adapter, _Accelerator())
    config.repa.repa_encoder = "someone/not-cached-encoder"  # offline (conftest): one line, not a traceback
    with pytest.raises(InputError) as error:
        check_terms(config, adapter, _Accelerator())
    assert "\n" not in str(error.value) and "HF_HUB_OFFLINE" in str(error.value)


# -- in-process runs: the gradient, the feature cache ---------------------------------------------------------
def _build_run(tmp_path, *extra, sd=False):
    """What training.train does up to the loop, in this process (2 steps, REPA on, SADM off); `sd`: the tiny SD
    pipeline on images of several aspect ratios."""
    from sadm_finetune.train.builders import build_run, make_accelerator, weight_dtype_of
    from sadm_finetune.data.datasets import open_train_data
    from sadm_finetune.data.loader import build_train_dataloader
    from sadm_finetune.families.loading import load_family
    from sadm_finetune.terms import check_terms

    encoder = build_tiny_encoder(tmp_path / "enc")
    args = ["--report_to", "none", "--structure_weight", "0", "--max_train_steps", "2",
            "--latent_cache_dir", str(tmp_path / "cache")]
    if sd:
        from tiny_sd import build_mixed_aspect_folder, build_tiny_sd_pipeline

        base = build_tiny_sd_pipeline(tmp_path / "sd")
        build_mixed_aspect_folder(tmp_path / "data")
        args += ["--pretrained", str(base), "--train_batch_size", "2", *repa_args(encoder, depth=2, resolution=28)]
    else:
        build_image_folder(tmp_path / "data", per_class=4)
        args += repa_args(encoder)
    config = _config(tmp_path, *args, *extra)
    accelerator = make_accelerator(config, tmp_path / "out")
    set_seed(0)
    adapter = load_family(config.model)
    adapter.set_resolution(32)
    check_terms(config, adapter, accelerator)
    adapter.prepare_training()
    for module in adapter.frozen_modules():  # as training.train: on the device, in the weight dtype
        module.requires_grad_(False)
        module.to(accelerator.device, dtype=weight_dtype_of(accelerator))
        module.eval()
    dataset, loader = build_train_dataloader(config, accelerator, adapter, open_train_data(config.data), 32)
    run, loader, _ = build_run(config, accelerator, adapter, loader)
    term = next(t for t in run.terms if t.name == "repa")
    return run, loader, dataset, term, encoder


def _train(run, loader, dataset):
    from sadm_finetune.train.checkpointing import TrainState
    from sadm_finetune.train.loop import train_loop

    state = TrainState()
    train_loop(run, loader, dataset, state, lambda s: None)
    return state


def test_gradient_reaches_the_denoiser_up_to_the_block_and_the_projector_never_the_encoder(tmp_path):
    from sadm_finetune.terms import StepContext

    run, loader, dataset, term, encoder_path = _build_run(tmp_path)
    assert term.feature_blocks == (0,) and list(run.joint_modules) == ["repa.projector"]
    denoiser, projector, encoder = run.unwrapped_denoiser, term.unwrapped_projector, term.encoder.model
    optimized = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in projector.parameters())
    assert not any(id(p) in optimized for p in encoder.parameters())
    assert [m.out_features for m in projector if isinstance(m, torch.nn.Linear)] == [16, 16, 16]
    assert projector[0].in_features == 32  # the DiT's hidden width

    # REPA's loss alone: block 0's output feeds it, the final layer and the output projection do not.
    batch = next(iter(loader))
    latents = torch.randn(4, 4, 8, 8)
    timesteps = torch.randint(0, 1000, (4,))
    cond = run.adapter.conditioning(batch, run.accelerator.device, torch.float32, drop=False)
    with run.adapter.capture_hidden(denoiser, run.feature_blocks()) as hidden:
        run.adapter.predict(run.denoiser, latents, timesteps, cond)
    ctx = StepContext(0, batch, latents, None, timesteps, latents, cond, None, None, None, hidden)
    loss, logs = term.loss(ctx)
    assert loss.shape == (4,) and loss.dtype == torch.float32
    assert logs["repa_cosine"].item() == pytest.approx(-loss.mean().item(), abs=1e-6)
    loss.mean().backward()
    grads = {name: p.grad for name, p in denoiser.named_parameters()}
    assert grads["transformer_blocks.0.attn1.to_q.weight"].abs().sum() > 0
    assert grads["pos_embed.proj.weight"].abs().sum() > 0
    assert grads["proj_out_2.weight"] is None  # after the aligned block
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert all(p.grad is None for p in encoder.parameters())
    run.optimizer.zero_grad(set_to_none=True)

    # Training steps: the denoiser and the projector move; the encoder stays bit for bit as saved.
    before = {k: v.clone() for k, v in projector.state_dict().items()}
    _train(run, loader, dataset)
    assert any(not torch.equal(before[k], v) for k, v in projector.state_dict().items())
    saved = load_file(str(encoder_path / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in encoder.state_dict().items() if k in saved)
    assert all(p.grad is None for p in encoder.parameters())


def test_bf16_run_keeps_the_encoder_in_the_weight_dtype_and_the_loss_in_fp32(tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # this test's accelerator uses another precision than the others
    try:
        run, loader, dataset, term, _ = _build_run(tmp_path, "--mixed_precision", "bf16")
        assert run.accelerator.mixed_precision == "bf16"
        assert term.encoder.dtype == torch.bfloat16 and term.encoder(torch.zeros(1, 3, 32, 32)).dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in term.unwrapped_projector.parameters())  # trained in fp32
        logs, dtypes = [], []
        run.accelerator.log = lambda values, step: logs.append(values)
        loss = term.loss
        term.loss = lambda ctx: (lambda out: dtypes.append(out[0].dtype) or out)(loss(ctx))
        _train(run, loader, dataset)
        assert dtypes == [torch.float32, torch.float32]
        assert len(logs) == 2 and all(-1 <= entry["repa_cosine"] <= 1 for entry in logs)
    finally:
        AcceleratorState._reset_state()


def test_building_the_feature_cache_leaves_the_global_random_generator_alone(tmp_path, monkeypatch):
    """A run that builds REPA's feature cache trains as one that finds it: encoding draws nothing from torch's global
    generator."""
    from sadm_finetune.terms.repa import cache

    states = []
    real = cache.build_feature_cache

    def build(*args, **kwargs):
        states.append(torch.random.get_rng_state())
        out = real(*args, **kwargs)
        states.append(torch.random.get_rng_state())
        return out

    monkeypatch.setattr(cache, "build_feature_cache", build)
    _build_run(tmp_path, "--cache_latents", "--center_crop")
    assert len(states) == 2 and torch.equal(*states)


def test_cached_latents_carry_the_features_of_the_orientation_drawn(tmp_path, monkeypatch):
    from sadm_finetune.data.datasets import open_train_data
    from sadm_finetune.data.latent_cache import _PixelRows

    run, loader, dataset, term, encoder_path = _build_run(tmp_path, "--cache_latents", "--center_crop",
                                                          "--random_flip")
    assert term.encoder is None  # training never loads it: the features come from the cache
    (folder,) = (tmp_path / "cache").glob("*/repa-*")
    assert (folder / "manifest.json").is_file()

    encoder = VisionEncoder.from_pretrained(str(encoder_path), 42, torch.device("cpu"), torch.float32)
    data = open_train_data(run.config.data)
    seen = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            sample = dataset[index]
            pixels = _PixelRows(data, [index], (32, 32), "error")[0]["pixels"][None]
            flipped = sample["flips"]
            expected = encoder(pixels.flip(-1) if flipped else pixels)[0]
            assert torch.allclose(sample[FEATURES_KEY], expected, atol=1e-5), (index, flipped)
            seen.add(flipped)
    assert seen == {False, True}

    # The encoder is never called in the training steps, and the loss reads the cached features.
    def refuse(*args, **kwargs):
        raise AssertionError("the encoder ran during training")

    monkeypatch.setattr(VisionEncoder, "__call__", refuse)
    read = []
    original = RepaTerm.target_features
    monkeypatch.setattr(RepaTerm, "target_features", lambda self, batch: read.append(FEATURES_KEY in batch)
                        or original(self, batch))
    dataset.set_epoch(0)
    assert _train(run, loader, dataset).global_step == 2
    assert read == [True, True]


def test_unet_on_aspect_ratio_buckets_reads_the_features_of_each_bucket_from_the_cache(tmp_path):
    from sadm_finetune.data.datasets import open_train_data
    from sadm_finetune.data.latent_cache import _PixelRows

    run, loader, dataset, term, encoder_path = _build_run(
        tmp_path, "--aspect_ratio_buckets", "--cache_latents", "--center_crop", "--random_flip", sd=True)
    assert term.feature_blocks == (1,) and term.unwrapped_projector[0].in_features == 64  # the 2nd down stage
    (folder,) = (tmp_path / "cache").glob("*/repa-*")
    stored = load_file(str(folder / "shard-00000.safetensors"))
    assert {k.split(".")[0] for k in stored} == {"features", "features_flipped"}
    assert {k.split(".")[1] for k in stored} == {"32x32", "48x24", "24x48"}
    assert stored["features.48x24"].shape[1:] == (16, 5, 2)  # 40x20 encoder pixels: 28^2 at the bucket's aspect

    encoder = VisionEncoder.from_pretrained(str(encoder_path), 28, torch.device("cpu"), torch.float32)
    data = open_train_data(run.config.data)
    for index in range(len(dataset)):
        sample = dataset[index]
        size = tuple(dataset.target_sizes[index].tolist())
        pixels = _PixelRows(data, [index], size, "error")[0]["pixels"][None]
        expected = encoder(pixels.flip(-1) if sample["flips"] else pixels)[0]
        assert torch.allclose(sample[FEATURES_KEY], expected, atol=1e-5), (index, size)

    shapes = []
    loss = term.loss
    term.loss = lambda ctx: shapes.append((tuple(ctx.latents.shape[-2:]), tuple(ctx.batch[FEATURES_KEY].shape[-2:]))) \
        or loss(ctx)
    assert _train(run, loader, dataset).global_step == 2 and len(shapes) == 2
    grids = {(8, 8): (4, 4), (12, 6): (5, 2), (6, 12): (2, 5)}  # latent grid -> the encoder grid of its bucket
    assert all(grids[latent] == features for latent, features in shapes), shapes


def test_feature_cache_is_keyed_on_the_encoder_and_reused(tmp_path):
    from accelerate import Accelerator

    from sadm_finetune.data.latent_cache import build_latent_cache
    from sadm_finetune.terms.repa.cache import build_feature_cache

    config = _config(tmp_path, "--cache_latents", "--center_crop", "--latent_cache_dir", str(tmp_path / "cache"))
    from sadm_finetune.data.datasets import open_train_data
    from sadm_finetune.families.loading import load_family

    build_image_folder(tmp_path / "data", per_class=2)
    data = open_train_data(config.data)
    adapter = load_family(config.model)
    accelerator = Accelerator(cpu=True)
    latents = build_latent_cache(accelerator, adapter.vae, data, config.data, 32, 4)

    def encoder(seed, resolution=28):
        path = build_tiny_encoder(tmp_path / f"enc{seed}", seed=seed)
        return VisionEncoder.from_pretrained(str(path), resolution, torch.device("cpu"), torch.float32)

    first = build_feature_cache(accelerator, encoder(0), data, config.data, latents, 4)
    assert first.parent == latents
    mtime = (first / "shard-00000.safetensors").stat().st_mtime_ns
    assert build_feature_cache(accelerator, encoder(0), data, config.data, latents, 4) == first  # a hit: reused
    assert (first / "shard-00000.safetensors").stat().st_mtime_ns == mtime
    assert build_feature_cache(accelerator, encoder(1), data, config.data, latents, 4) != first  # other weights
    assert build_feature_cache(accelerator, encoder(0, 42), data, config.data, latents, 4) != first  # other size
    assert set(load_file(str(first / "shard-00000.safetensors"))) == {"features.32x32"}  # no flip: one orientation


# -- end to end through the CLI ---------------------------------------------------------------------------------
def _tensors(folder):
    return load_file(str(next(folder.glob("*.safetensors"))))


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True], ids=["pixels", "cached-latents"])
def test_cli_run_with_repa_logs_the_cosine_and_exports_a_stock_pipeline(tmp_path, stock_diffusers, cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data", per_class=4)
    encoder = build_tiny_encoder(tmp_path / "enc")
    out = tmp_path / "out"
    extra = ["--cache_latents", "--center_crop", "--random_flip", "--latent_cache_dir", str(tmp_path / "cache")] \
        if cache else []
    proc = train_in_process(tiny_run_args(base, data, out, steps=3) + repa_args(encoder) + extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = re.findall(r"REPA: lambda 0.5, block 1, encoder .* at 42 px, projector .*", proc.stdout)
    assert len(summary) == 1 and summary[0].endswith("(features cached)") == cache, proc.stdout[-2000:]
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"repa_cosine", "structure_loss_g", "loss_diffusion"} <= tags, tags  # REPA beside SADM
    assert len(events.Scalars("repa_cosine")) == 3
    if cache:
        assert "REPA feature cache: encoding" in proc.stdout + proc.stderr
        assert list((tmp_path / "cache").glob("*/repa-*/manifest.json"))

    base_tr, new_tr = _tensors(base / "transformer"), _tensors(out / "transformer")
    assert base_tr.keys() == new_tr.keys()  # no projector in the export
    assert not any("projector" in p.name for p in out.rglob("*"))
    assert stock_diffusers.load(out, class_labels=[0]) == {
        "cls": "DiTPipeline", "shape": [1, 32, 32, 3], "finite": True, "labels": {"class_0": 0, "class_1": 1},
        "sadm_finetune_imported": False}


def _resumed_step(text):
    found = re.findall(r"Resumed from \S+ at step (\d+)", text)
    assert len(found) == 1, text[-3000:]
    return int(found[0])


@pytest.mark.slow
def test_resume_with_repa_continues_the_checkpoints_projector(tmp_path):
    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data", per_class=5)
    encoder = build_tiny_encoder(tmp_path / "enc")
    extra = repa_args(encoder) + ["--checkpointing_steps", "3", "--random_flip", "--report_to", "none",
                                  "--structure_weight", "0"]

    def run(out, checkpoint=None):
        if checkpoint is not None:
            (out / "checkpoints").mkdir(parents=True)
            shutil.copytree(checkpoint, out / "checkpoints" / "checkpoint-3")
            extra_resume = ["--resume_from_checkpoint", "latest"]
        else:
            extra_resume = []
        proc = train_in_process(tiny_run_args(base, data, out, steps=6) + extra + extra_resume)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if checkpoint is not None:
            assert _resumed_step(proc.stdout + proc.stderr) == 3
        # model_1: the projector, prepared right after the denoiser (builders.build_run's order)
        projector = load_file(str(out / "checkpoints" / "checkpoint-6" / "model_1.safetensors"))
        return _tensors(out / "transformer"), projector

    full_tr, full_proj = run(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoints" / "checkpoint-3"
    layers = {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}  # the projector's three Linears
    assert set(load_file(str(ckpt / "model_1.safetensors"))) == layers
    resumed_tr, resumed_proj = run(tmp_path / "resumed", ckpt)
    assert max((full_tr[k] - resumed_tr[k]).abs().max().item() for k in full_tr) <= 1e-6
    assert max((full_proj[k] - resumed_proj[k]).abs().max().item() for k in full_proj) <= 1e-6

    # The resumed run continued from the checkpoint's projector: a nudge written into it is still there 3 steps on
    # (a projector rebuilt from the seeded initialisation would not carry it).
    nudged_ckpt = tmp_path / "nudged-ckpt"
    shutil.copytree(ckpt, nudged_ckpt)
    weights = load_file(str(nudged_ckpt / "model_1.safetensors"))
    weights["4.bias"][0] += 0.5
    save_file(weights, str(nudged_ckpt / "model_1.safetensors"))
    _, nudged_proj = run(tmp_path / "nudged", nudged_ckpt)
    shift = (nudged_proj["4.bias"][0] - resumed_proj["4.bias"][0]).item()
    assert 0.4 < shift < 0.6, shift


@pytest.mark.slow
def test_two_processes_keep_the_projector_identical(repa_sddit_ddp_run):
    """The projector trained by the denoiser's optimizer stays in step under DDP (the 2-process run is shared with
    test_sddit: REPA and SD-DiT on together, conftest.py)."""
    assert {"denoiser", "repa.projector", "discriminator"} <= set(repa_sddit_ddp_run.identical), \
        repa_sddit_ddp_run.text[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_repa_with_sadm_trains_the_text_transformer_families(tmp_path, family):
    """The terms read hidden states through the family adapter's hooks, so REPA (beside SADM) runs on SD3's MMDiT
    (image tokens of a joint block) and PixArt's transformer as on DiT; the export keeps the base's keys."""
    from tiny_sd import build_captioned_folder

    if family == "sd3":
        from tiny_sd3 import build_tiny_sd3_pipeline as build
        extra = []
    else:
        from tiny_pixart import build_tiny_pixart_pipeline as build
        extra = ["--resolution", "32"]  # the tiny PixArt's stock default is 256 px; it trains at 32
    base = build(tmp_path / "base")
    data = build_captioned_folder(tmp_path / "data")
    encoder = build_tiny_encoder(tmp_path / "enc")
    out = tmp_path / "out"
    proc = train_in_process(tiny_run_args(base, data, out, steps=2) + repa_args(encoder) + extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"REPA: lambda 0.5, block 1, encoder .* at 42 px", proc.stdout), proc.stdout[-2000:]
    assert "SADM: lambda 0.01" in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    cosines = [e.value for e in events.Scalars("repa_cosine")]
    assert len(cosines) == 2 and all(-1 <= c <= 1 for c in cosines)  # the term ran on every step
    base_tr, new_tr = _tensors(base / "transformer"), _tensors(out / "transformer")
    assert base_tr.keys() == new_tr.keys()  # no projector in the export
    assert max((base_tr[k] - new_tr[k]).abs().max().item() for k in base_tr) > 0  # and it trained
