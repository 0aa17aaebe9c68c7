"""LoRA for both families: attach, merge, LoRA-only checkpoints, EMA, and the exported files end to end."""

import copy
import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DiTTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import PeftAdapterMixin
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from launch import tiny_run_args, train_in_process
from sadm_finetune.config.run import ModelConfig, build_config
from sadm_finetune.utils.errors import ConfigError
from sadm_finetune.tuners import lora
from sadm_finetune.families.dit import DiTAdapter
from sadm_finetune.families.loading import load_family
from sadm_finetune.families.sd import StableDiffusionAdapter
from sadm_finetune.train.builders import prepare_denoiser
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline
from tiny_sd import build_captioned_folder, build_tiny_sd_pipeline


class DiTTransformer2DModelWithLoRA(DiTTransformer2DModel, PeftAdapterMixin):
    """What the model card tells DiT users to write: diffusers has no LoRA loader for DiT."""


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    return build_tiny_dit_pipeline(tmp_path_factory.mktemp("dit") / "base", num_classes=2)


def _dit_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g),), {"timestep": torch.tensor([10, 600]),
                                                      "class_labels": torch.tensor([0, 1])}


def _randomise_lora(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)


def test_default_targets_per_family():
    cfg = lora.make_lora_config(ModelConfig(lora_rank=4), StableDiffusionAdapter.lora_target_modules)
    assert set(cfg.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"} and cfg.lora_alpha == 4
    cfg = lora.make_lora_config(ModelConfig(lora_alpha=2.0, lora_target_modules=["attn1.to_q"]),
                                DiTAdapter.lora_target_modules)
    assert set(cfg.target_modules) == {"attn1.to_q"} and cfg.r == 8 and cfg.lora_alpha == 2.0


def test_unknown_target_is_a_config_error(tiny_dit):
    model = DiTTransformer2DModel.from_pretrained(tiny_dit, subfolder="transformer")
    with pytest.raises(ConfigError, match="lora_target_modules: none of \\['nope'\\]"):
        lora.attach_lora(model, lora.make_lora_config(ModelConfig(lora_target_modules=["nope"]), ()))


def test_base_in_weight_dtype_lora_in_fp32(tiny_dit):
    config = build_config({"pretrained_model_name_or_path": str(tiny_dit), "train_data_dir": "d", "trainable": "lora"})
    adapter = load_family(config.model)
    denoiser = prepare_denoiser(config, adapter, torch.device("cpu"), torch.bfloat16)
    trainable = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    frozen = [p for p in denoiser.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    args, kwargs = _dit_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = denoiser(*args, **kwargs).sample.float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())


@pytest.mark.parametrize("family", ["dit", "sd"])
def test_merge_matches_the_adapter_model_and_keeps_the_base_keys(tiny_dit, tmp_path, family):
    if family == "dit":
        base = DiTTransformer2DModel.from_pretrained(tiny_dit, subfolder="transformer")
        targets, (args, kwargs) = DiTAdapter.lora_target_modules, _dit_inputs()
    else:
        base = UNet2DConditionModel.from_pretrained(build_tiny_sd_pipeline(tmp_path / "sd"), subfolder="unet")
        targets = StableDiffusionAdapter.lora_target_modules
        args, kwargs = (torch.randn(2, 4, 8, 8), torch.tensor([10, 600]), torch.randn(2, 16, 32)), {}
    cfg = lora.make_lora_config(ModelConfig(lora_rank=4, lora_alpha=8.0), targets)
    model = lora.attach_lora(copy.deepcopy(base), cfg).eval()
    _randomise_lora(model)
    merged = lora.merge_lora(copy.deepcopy(base), cfg, lora.lora_state_dict(model)).eval()
    assert merged.state_dict().keys() == base.state_dict().keys()
    with torch.no_grad():
        expected, got = model(*args, **kwargs).sample, merged(*args, **kwargs).sample
        assert not torch.allclose(expected, base.eval()(*args, **kwargs).sample, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_checkpoints_hold_only_the_lora_and_restore_it(tiny_dit, tmp_path):
    accelerator = Accelerator(cpu=True)
    cfg = lora.make_lora_config(ModelConfig(lora_rank=4), DiTAdapter.lora_target_modules)

    def prepared():
        model = lora.attach_lora(DiTTransformer2DModel.from_pretrained(tiny_dit, subfolder="transformer"), cfg)
        model = accelerator.prepare(model)
        lora.register_lora_checkpointing(accelerator, model)
        return model

    model = prepared()
    _randomise_lora(model)
    accelerator.save_state(str(tmp_path / "ckpt"))
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    expected = lora.lora_state_dict(model)

    accelerator = Accelerator(cpu=True)
    fresh = prepared()
    accelerator.load_state(str(tmp_path / "ckpt"))
    restored = lora.lora_state_dict(fresh)
    assert restored.keys() == expected.keys() and all(torch.equal(restored[k], expected[k]) for k in expected)


def _python_blocks(markdown):
    return [block.split("```", 1)[0] for block in markdown.split("```python\n")[1:]]


@pytest.mark.slow
def test_sd_lora_run_writes_lean_outputs_that_stock_tools_load_whole(tmp_path, stock_diffusers, monkeypatch):
    """A LoRA run on SD with non-default targets: the LoRA files (diffusers and kohya), card, samples, config and D,
    no merged pipeline; the final samples are the base with the written file applied; the card's code runs."""
    base = build_tiny_sd_pipeline(tmp_path / "base")
    data = build_captioned_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=3) + [
        "--trainable", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--gradient_checkpointing",
        "--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
        "--use_ema", "--ema_decay", "0.9", "--checkpointing_steps", "3", "--report_to", "none"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]

    kohya = "pytorch_lora_weights_kohya.safetensors"
    assert {p.name for p in out.iterdir()} == {"pytorch_lora_weights.safetensors", kohya, "README.md", "samples",
                                              "training_config.yaml", "structure_discriminator", "checkpoints"}
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)  # one key style
    assert any(".proj_in.lora_A." in k for k in keys) and any(".attn2.to_q.lora_A." in k for k in keys)
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8

    # The final samples are the base pipeline with the written file applied by stock load_lora_weights.
    original = StableDiffusionPipeline.from_pretrained(base)
    original.set_progress_bar_config(disable=True)
    before = original(["a red square"], num_inference_steps=2, guidance_scale=1.5, generator=torch.manual_seed(0),
                      output_type="np").images[0]
    original.load_lora_weights(out)
    after = original(["a red square"], num_inference_steps=2, guidance_scale=1.5, generator=torch.manual_seed(0),
                     output_type="np").images[0]
    first = np.asarray(Image.open(out / "samples" / "final-0.png"), dtype=np.float64) / 255
    np.testing.assert_allclose(first, after, atol=1 / 255 + 1e-6)
    assert np.abs(after - before).max() > 1e-3

    # The card: the Hub's LoRA metadata, and its usage code runs as written (the local folders for the names).
    card = ModelCard.load(out / "README.md")
    assert {"lora", "template:sd-lora", "diffusers-training", "stable-diffusion"} <= set(card.data.tags)
    assert card.data.widget[0] == {"text": "a red square", "output": {"url": "samples/final-0.png"}}
    assert all((out / w["output"]["url"]).is_file() for w in card.data.widget)
    assert kohya in card.text and "ComfyUI" in card.text and "model_index.json" not in card.text
    code = _python_blocks(card.text)[0]
    assert 'from_pretrained("base"' in code and 'load_lora_weights("out"' in code and "pipe(" in code
    monkeypatch.chdir(tmp_path)  # "base" and "out" are the folders' names: they resolve here, as the Hub ids would
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    np.testing.assert_allclose(np.asarray(namespace["image"], dtype=np.float64) / 255, after, atol=1 / 255 + 1e-6)
    assert (tmp_path / "sample.png").is_file()

    # Stock diffusers (no sadm_finetune) loads each file onto the base: the same images.
    seen = stock_diffusers.load(base, prompts=["a red square"], lora=out,
                                lora_weight_names=["pytorch_lora_weights.safetensors", kohya])
    assert seen.get("error") is None and not seen["sadm_finetune_imported"], seen.get("error")
    images = {name: np.asarray(value) for name, value in seen["lora_images"].items()}
    np.testing.assert_allclose(images[kohya], images["pytorch_lora_weights.safetensors"], atol=1e-5)

    # The export is the EMA of the LoRA weights, not the raw ones; the checkpoint holds both, LoRA only.
    ckpt = out / "checkpoints" / "checkpoint-3"
    raw = load_file(str(ckpt / "model.safetensors"))
    assert raw and all("lora_" in k for k in raw)
    assert not list(ckpt.glob("custom_checkpoint_*"))  # the EMA is stored without pickle (docs/checkpoints.md)
    shadow = list(load_file(str(ckpt / "ema.safetensors")).values())
    exported = load_file(str(out / "pytorch_lora_weights.safetensors")).values()
    assert len(shadow) == len(raw) == len(exported)  # the EMA covers the LoRA parameters only

    def found(t, pool):  # copies of the same tensors (no arithmetic in between): bit for bit
        return any(t.shape == p.shape and torch.equal(t, p) for p in pool)

    assert all(found(t, shadow) for t in exported)
    assert not all(found(t, raw.values()) for t in exported)


@pytest.mark.slow
def test_dit_lora_merged_export_and_resume(tiny_dit, tmp_path):
    data = build_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=4)
    out = tmp_path / "out"
    args = tiny_run_args(tiny_dit, data, out, steps=3) + [
        "--trainable", "lora", "--lora_rank", "4", "--learning_rate", "1e-2", "--checkpointing_steps", "3",
        "--cache_latents", "--center_crop", "--random_flip", "--latent_cache_dir", str(tmp_path / "cache"),
        "--report_to", "none"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "latent cache: encoding" in proc.stdout

    exported = DiTTransformer2DModel.from_pretrained(out, subfolder="transformer").eval()
    # The saved FILE has exactly the base's keys (a loaded model's state_dict() would hide extra keys).
    with safe_open(str(tiny_dit / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        base_keys = set(f.keys())
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert set(f.keys()) == base_keys
    plain = DiTTransformer2DModel.from_pretrained(tiny_dit, subfolder="transformer").eval()
    with_lora = DiTTransformer2DModelWithLoRA.from_pretrained(tiny_dit, subfolder="transformer")
    with_lora.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="transformer",
                                use_safetensors=True)
    args_, kwargs = _dit_inputs()
    with torch.no_grad():
        torch.testing.assert_close(exported(*args_, **kwargs).sample, with_lora.eval()(*args_, **kwargs).sample,
                                   rtol=1e-4, atol=1e-5)
        # ... and the LoRA did change the model (a merge of an untrained or dropped LoRA would pass the above).
        changed = (exported(*args_, **kwargs).sample - plain(*args_, **kwargs).sample).abs().max().item()
    assert changed > 1e-3, changed
    assert "load_lora_adapter" in (out / "README.md").read_text()

    # Resuming the final checkpoint restores the LoRA (and D): the re-export, merged again from the files,
    # matches to float tolerance (the merge is arithmetic: not a bitwise claim).
    first = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    proc = train_in_process(args + ["--resume_from_checkpoint", "latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "latent cache: hit" in proc.stdout
    assert "checkpoint-3 at step 3" in proc.stdout  # resumed, not retrained from step 0 (which replays the same noise)
    second = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert first.keys() == second.keys()
    for k in first:
        torch.testing.assert_close(second[k], first[k], rtol=1e-6, atol=1e-7)
