"""DiT at another resolution than its base's (docs/design.md §7): sample_size and the fixed sin-cos positional
embedding, in training and in the stock export.

The tiny base is 32 px (latents 8x8, patch 2: a 4x4 token grid); the runs here train it at 64 px (an 8x8 grid).
"""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, Transformer2DModel

from launch import train_in_process
from sadm_finetune.cli import main
from sadm_finetune.config.run import ModelConfig
from sadm_finetune.tuners import lora
from sadm_finetune.families.dit import DiTAdapter
from sadm_finetune.families.loading import load_family
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

BASE_GRID, NEW_GRID = 4, 8  # tokens per side at 32 px and at 64 px
EMBED_DIM = 32  # 2 heads x 16


def sincos(positions: np.ndarray) -> torch.Tensor:
    """DiT's 2D sin-cos embedding of a square grid at the given 1-D positions, from its definition (float64):
    token (row r, column c) -> [sin(x w), cos(x w), sin(y w), cos(y w)] with x = positions[c], y = positions[r],
    w_k = 10000^(-k / (D/4)), k < D/4. -> (n*n, D)"""
    omega = 1.0 / 10000 ** (np.arange(EMBED_DIM // 4) / (EMBED_DIM / 4))
    y, x = np.meshgrid(positions, positions, indexing="ij")
    x, y = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    return torch.from_numpy(np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1))


def added_embedding(transformer: torch.nn.Module, grid: int) -> torch.Tensor:
    """What the patch embedding adds to the projected patches at a grid x grid input, as the module computes it."""
    patch_embed = transformer.pos_embed
    size = grid * transformer.config.patch_size
    latents = torch.randn(1, transformer.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (patch_embed(latents) - patch_embed.proj(latents).flatten(2).transpose(1, 2))[0].double()


def forward(transformer: torch.nn.Module, grid: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    size = grid * transformer.config.patch_size
    latents = torch.randn(3, transformer.config.in_channels, size, size, generator=gen)
    timesteps, class_labels = torch.tensor([3, 400, 999]), torch.tensor([0, 1, 1000])  # 1000: the null class
    with torch.no_grad():
        return transformer(latents, timestep=timesteps, class_labels=class_labels).sample


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_dit_pipeline(tmp_path_factory.mktemp("dit") / "base", num_classes=2)


@pytest.fixture
def adapter(base) -> DiTAdapter:
    adapter = load_family(ModelConfig(pretrained_model_name_or_path=str(base)))
    adapter.set_resolution(64)
    return adapter


def test_export_reproduces_the_trained_model_exactly(adapter, tmp_path):
    """Same process, same operations: the stock reload's forward at the new grid equals the training model's, bit for
    bit. Without the rebuilt embedding, training would use diffusers' on-the-fly (interpolated) one and differ."""
    model = adapter.denoiser
    assert model.config.sample_size == 16 and adapter.default_resolution() == 64
    adapter.prepare_training()
    with torch.no_grad():  # stands in for training: the export must carry these weights, not the base's
        gen = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.eval()
    adapter.export_pipeline(model).save_pretrained(tmp_path / "out", safe_serialization=True)

    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "out", use_safetensors=True).transformer
    assert type(reloaded) is DiTTransformer2DModel and reloaded.config.sample_size == 16
    assert torch.equal(forward(reloaded, NEW_GRID), forward(model, NEW_GRID))
    base = DiTTransformer2DModel.from_pretrained(adapter.config.pretrained_model_name_or_path, subfolder="transformer")
    assert not torch.allclose(forward(base, NEW_GRID), forward(model, NEW_GRID), atol=1e-3)  # the nudge is there


def test_extend_and_interpolate_are_their_definitions_and_differ(adapter):
    base = DiTTransformer2DModel.from_pretrained(adapter.config.pretrained_model_name_or_path, subfolder="transformer")
    base_embedding = added_embedding(base, BASE_GRID)
    assert torch.allclose(base_embedding, sincos(np.arange(BASE_GRID)), atol=1e-6)

    # extend (what training uses): positions 0..7, the base's spacing; its top-left 4x4 block is the base's grid.
    extend = added_embedding(adapter.denoiser, NEW_GRID)
    assert torch.allclose(extend, sincos(np.arange(NEW_GRID)), atol=1e-6)
    block = extend.reshape(NEW_GRID, NEW_GRID, -1)[:BASE_GRID, :BASE_GRID].reshape(-1, EMBED_DIM)
    assert torch.allclose(block, base_embedding, atol=1e-6)

    # interpolate: positions 0, 0.5, ..., 3.5 on the base's range, which diffusers computes when the base model (its
    # sample_size unchanged) meets the larger grid; every other token sits on a base position.
    interpolate = added_embedding(base, NEW_GRID)
    assert torch.allclose(interpolate, sincos(np.arange(NEW_GRID) * BASE_GRID / NEW_GRID), atol=1e-6)
    every_other = interpolate.reshape(NEW_GRID, NEW_GRID, -1)[::2, ::2].reshape(-1, EMBED_DIM)
    assert torch.allclose(every_other, base_embedding, atol=1e-6)

    assert (extend - interpolate).abs().max() > 0.5


def test_stock_diffusers_cannot_hold_interpolate_at_the_new_sample_size(tmp_path):
    """Why --pos_embed_transfer interpolate is refused. Transformer2DModel expresses it (sample_size 16,
    interpolation_scale 2), but diffusers loads a saved one with DiT's norm as DiTTransformer2DModel, which has no
    interpolation_scale and extends. If a diffusers release keeps the scale, this fails: lift the refusal then."""
    legacy = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=16, patch_size=2, num_embeds_ada_norm=1000,
                                norm_type="ada_norm_zero", norm_elementwise_affine=False, interpolation_scale=2)
    interpolate = sincos(np.arange(NEW_GRID) * BASE_GRID / NEW_GRID)
    assert torch.allclose(added_embedding(legacy, NEW_GRID), interpolate, atol=1e-6)
    legacy.save_pretrained(tmp_path / "legacy")
    assert json.loads((tmp_path / "legacy" / "config.json").read_text())["interpolation_scale"] == 2

    reloaded = Transformer2DModel.from_pretrained(tmp_path / "legacy")
    assert type(reloaded) is DiTTransformer2DModel
    assert torch.allclose(added_embedding(reloaded, NEW_GRID), sincos(np.arange(NEW_GRID)), atol=1e-6)


def test_lora_export_and_model_card_code_rebuild_the_model_at_the_new_size(adapter, tmp_path, monkeypatch):
    """A LoRA run's two outputs: the merge into a fresh base (load_component) and the model card's code that applies
    the LoRA file to the base from the Hub; both must give the model trained at the new size."""
    fresh = adapter.load_component("transformer")
    assert fresh is not adapter.denoiser and fresh.config.sample_size == 16
    assert torch.equal(added_embedding(fresh, NEW_GRID), added_embedding(adapter.denoiser, NEW_GRID))

    lora_config = lora.make_lora_config(ModelConfig(lora_rank=4), adapter.lora_target_modules)
    trained = lora.attach_lora(adapter.denoiser, lora_config).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in trained.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    state = lora.lora_state_dict(trained)
    adapter.save_lora_weights(tmp_path, state, lora.lora_metadata(lora_config))
    merged = lora.merge_lora(fresh, lora_config, state).eval()

    code = adapter.lora_usage(adapter.config.pretrained_model_name_or_path, str(tmp_path), lora.LORA_WEIGHT_NAME,
                              adapter.example_call(1, 1, 1.0, 0))
    assert 'subfolder="transformer", sample_size=16, dtype=dtype)' in code
    scope: dict = {}
    monkeypatch.chdir(tmp_path)  # it saves sample.png
    exec(code, scope)  # the card's code, as a user runs it
    card_model, pipe = scope["transformer"].eval(), scope["pipe"]
    assert card_model.config.sample_size == 16 and pipe.transformer is card_model
    assert scope["image"].size == (64, 64) and (tmp_path / "sample.png").is_file()  # the card's pipe(...) call
    torch.testing.assert_close(forward(card_model, NEW_GRID), forward(trained, NEW_GRID), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(forward(merged, NEW_GRID), forward(trained, NEW_GRID), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a training run, through the CLI in this process
def test_cli_run_at_twice_the_base_resolution_exports_a_stock_pipeline_of_that_size(base, tmp_path, stock_diffusers):
    data = build_image_folder(tmp_path / "data", per_class=2, size=40)
    out = tmp_path / "out"
    args = ["--pretrained", str(base), "--train_data_dir", str(data), "--output_dir", str(out), "--resolution", "64",
            "--pos_embed_transfer", "extend", "--max_train_steps", "2", "--train_batch_size", "2",
            "--structure_weight", "0", "--num_validation_images", "1", "--validation_inference_steps", "1",
            "--report_to", "none"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "transformer" / "config.json").read_text())["sample_size"] == 16

    # Stock diffusers, in a process that never imports sadm_finetune, samples at the trained size: DiTPipeline
    # draws latents of the loaded transformer's sample_size, so 64 px images mean it loaded sample_size 16.
    assert stock_diffusers.load(out, class_labels=[0, 1]) == {
        "cls": "DiTPipeline", "shape": [2, 64, 64, 3], "finite": True, "labels": {"class_0": 0, "class_1": 1},
        "sadm_finetune_imported": False}


@pytest.mark.parametrize("pipeline_class, value, expected", [
    ("DiTPipeline", "interpolate", "pos_embed_transfer: interpolate cannot be exported"),
    ("StableDiffusionPipeline", "extend", "pos_embed_transfer: Stable Diffusion's UNet has no positional embedding"),
])
def test_refused_treatment_is_one_line_before_any_weights_load(tmp_path, capsys, pipeline_class, value, expected):
    weightless = tmp_path / "weightless"  # a model_index.json alone: the check must not need the weights
    weightless.mkdir()
    (weightless / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    args = ["--pretrained", str(weightless), "--train_data_dir", str(tmp_path / "data"), "--output_dir",
            str(tmp_path / "out"), "--resolution", "64", "--pos_embed_transfer", value, "--report_to", "none"]
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "sadm-train: error:" in line]
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "out").exists()
