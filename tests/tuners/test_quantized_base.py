"""LoRA on a quantized base (--quantize_base, --quantize_text_encoders): one-line refusals; a Flux LoRA run on an int8
base (torchao, the CPU backend) whose file stock `load_lora_weights` applies whole to the fp32 base, with the output
close to the quantized-trained model's; a DiT LoRA run on an int8 base whose merged export is the fp32 base with the
LoRA merged (never a dequantized int8 base); int8 text encoders that fill the text cache once and leave (a cache
keyed by their quantization, which a full-precision run does not reuse; an export with the encoders as stored)."""

import gc
import json
import weakref

import pytest
import torch
from accelerate import Accelerator
from diffusers import DiTTransformer2DModel, FluxPipeline
from peft.functional import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from launch import tiny_run_args, train_in_process
from sadm_finetune.cli import main
from sadm_finetune.config.run import ModelConfig, build_config
from sadm_finetune.data.text_cache import build_text_cache
from sadm_finetune.families.flux import FluxAdapter
from sadm_finetune.families.loading import load_family
from sadm_finetune.tuners import lora
from sadm_finetune.tuners.quantization import (check_environment, quantization_label, quantization_of,
                                               quantized_weights)
from sadm_finetune.utils.errors import ConfigError
from tiny_flux import build_tiny_flux_pipeline
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline
from tiny_sd import build_captioned_folder

pytest.importorskip("torchao")


@pytest.mark.parametrize("flags, field", [
    ({"quantize_base": "int8"}, "quantize_base"),  # trainable full
    ({"quantize_base": "int8", "trainable": "difffit"}, "quantize_base"),
    ({"trainable": "lora", "quantize_backend": "torchao"}, "quantize_backend"),
    ({"trainable": "lora", "quantize_base": "nf4", "quantize_backend": "torchao"}, "quantize_backend"),
])
def test_refusals(flags, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        build_config({"pretrained_model_name_or_path": "x", "train_data_dir": "d", **flags})


@pytest.mark.skipif(torch.cuda.is_available(), reason="nf4 runs where CUDA is visible")
def test_nf4_without_cuda_is_one_line_before_loading(tmp_path, capsys):
    with pytest.raises(ConfigError, match="^quantize_base: bitsandbytes .* needs a CUDA GPU"):
        check_environment(ModelConfig(trainable="lora", quantize_base="nf4"))
    base = build_tiny_flux_pipeline(tmp_path / "flux")
    capsys.readouterr()
    assert main(["--pretrained", str(base), "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                 "--trainable", "lora", "--quantize_base", "nf4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sadm-train: error: quantize_base: ") and len(err.splitlines()) == 1, err


FLUX_INPUTS = dict(hidden_states=(2, 16, 16), encoder_hidden_states=(2, 8, 32), pooled_projections=(2, 32))


def _flux_outputs(transformer) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(*shape, generator=g) for name, shape in FLUX_INPUTS.items()}
    with torch.no_grad():
        return transformer(**inputs, timestep=torch.tensor([0.3, 0.8]), img_ids=torch.zeros(16, 3),
                           txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5, 3.5])).sample


def test_flux_lora_on_an_int8_base_applies_to_the_fp32_base_with_stock_diffusers(tmp_path):
    base = build_tiny_flux_pipeline(tmp_path / "flux")
    data, out = build_captioned_folder(tmp_path / "data"), tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=3) + [
        "--resolution", "32", "--trainable", "lora", "--lora_rank", "4", "--learning_rate", "3e-2",
        "--quantize_base", "int8", "--quantize_text_encoders", "int8", "--validation_prompts", "a red square",
        "--report_to", "none"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "base int8 (torchao, 30 quantized Linear layers)" in proc.stdout  # all 30 of the tiny transformer
    file = load_file(str(out / "pytorch_lora_weights.safetensors"))
    state = {k.removeprefix("transformer."): v for k, v in file.items()}
    assert len(state) == len(file) == 30 and all(v.dtype == torch.float32 for v in state.values())

    # The quantized-trained model: the int8 base loaded as the run loaded it, with the file's LoRA on top.
    config = ModelConfig(pretrained_model_name_or_path=str(base), trainable="lora", lora_rank=4,
                         quantize_base="int8", quantize_text_encoders="int8")
    adapter = load_family(config)
    assert all(quantized_weights(m) > 0 for m in (adapter.denoiser, adapter.pipeline.text_encoder,
                                                  adapter.pipeline.text_encoder_2))
    int8 = adapter.denoiser.eval()
    int8_base = _flux_outputs(int8)
    lora.attach_lora(int8, lora.make_lora_config(config, FluxAdapter.lora_target_modules))
    assert type(int8.transformer_blocks[0].attn.to_q).__name__ == "TorchaoLoraLinear"  # peft's quantized layer
    assert not set_peft_model_state_dict(int8, state, adapter_name=lora.ADAPTER_NAME).unexpected_keys
    int8_lora = _flux_outputs(int8)

    # Stock diffusers on the full-precision base: every tensor of the file applied as written.
    pipe = FluxPipeline.from_pretrained(base)
    assert quantized_weights(pipe.transformer) == 0
    fp32_base = _flux_outputs(pipe.transformer)
    pipe.load_lora_weights(out)
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=next(iter(pipe.transformer.peft_config)))
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    fp32_lora = _flux_outputs(pipe.transformer)

    # Tolerance (measured, tiny Flux, 3 steps at 3e-2; max abs over the outputs, which reach ~1.9): the int8 base's
    # own error |fp32_base - int8_base| is 8.57e-3; the LoRA moves the outputs by 8.7e-2; its effect on the two bases
    # differs by 4.6e-4 (0.5% of it): the LoRA branch runs in fp32 on both, so only its interaction with the base's
    # rounding differs; and |fp32_lora - int8_lora| is 8.65e-3, the base's error plus 0.1% of the effect. Bounds
    # (~4x margin): the LoRA changes both models the same way within 2% of its effect, and the LoRA-applied fp32
    # model differs from the quantized-trained one by no more than the base's own quantization error + 2% of it.
    quant_error = (fp32_base - int8_base).abs().max()
    effect = (fp32_lora - fp32_base).abs().max()
    assert 0 < quant_error < 0.02 and effect > 2 * quant_error  # the LoRA trained, and not applying it would show
    assert ((fp32_lora - fp32_base) - (int8_lora - int8_base)).abs().max() <= 0.02 * effect
    assert (fp32_lora - int8_lora).abs().max() <= quant_error + 0.02 * effect


def test_dit_merged_export_of_an_int8_base_is_the_fp32_base_with_the_lora_merged(tmp_path):
    base = build_tiny_dit_pipeline(tmp_path / "dit")
    out = tmp_path / "out"
    args = tiny_run_args(base, build_image_folder(tmp_path / "data"), out, steps=2) + [
        "--trainable", "lora", "--lora_rank", "4", "--learning_rate", "3e-2", "--quantize_base", "int8",
        "--report_to", "none"]
    proc = train_in_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "base int8 (torchao, " in proc.stdout and "torchao, 0 quantized" not in proc.stdout
    exported = DiTTransformer2DModel.from_pretrained(out, subfolder="transformer")
    fresh = DiTTransformer2DModel.from_pretrained(base, subfolder="transformer")
    state = {k.removeprefix("transformer."): v for k, v in
             load_file(str(out / lora.LORA_WEIGHT_NAME)).items()}
    config = ModelConfig(trainable="lora", lora_rank=4)
    from sadm_finetune.families.dit import DiTAdapter

    expected = lora.merge_lora(fresh, lora.make_lora_config(config, DiTAdapter.lora_target_modules), state)
    got, want = exported.state_dict(), expected.state_dict()
    assert set(got) == set(want) and quantized_weights(exported) == 0
    assert all(v.dtype == torch.float32 and torch.equal(v, want[k]) for k, v in got.items())
    base_weights = DiTTransformer2DModel.from_pretrained(base, subfolder="transformer").state_dict()
    assert any(not torch.equal(got[k], base_weights[k]) for k in got)  # the LoRA is in it


def test_the_backward_keeps_a_torchao_base_quantized():
    import copy

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from sadm_finetune.tuners.quantization import keep_quantized_for_backward

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).requires_grad_(False)
    quantize_(plain, Int8WeightOnlyConfig())
    kept = copy.deepcopy(plain)
    assert keep_quantized_for_backward(kept) == 2

    def step(model):
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = model(x)
        y.pow(2).sum().backward()
        return y, x.grad, sum(saved)

    (y1, g1, saved1), (y2, g2, saved2) = step(plain), step(kept)
    assert torch.equal(y1, y2) and torch.allclose(g1, g2, rtol=0, atol=1e-6)  # the same function and gradient
    assert saved1 >= 64 * 128 + 128 * 64 and saved2 == 4 * 128  # autograd's own graph saved both fp32 weights


def test_quantization_labels_name_the_level_and_the_backend():
    from types import SimpleNamespace

    from transformers import BitsAndBytesConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    def loaded(config):  # a model as transformers / diffusers leave it after a quantized load
        module = torch.nn.Linear(2, 2)
        module.is_quantized, module.hf_quantizer = True, SimpleNamespace(quantization_config=config)
        return module

    assert quantization_label(loaded(BitsAndBytesConfig(load_in_8bit=True))) == "int8 (bitsandbytes)"
    nf4 = loaded(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.bfloat16))
    assert quantization_label(nf4) == "nf4 (bitsandbytes)" and quantization_of(nf4)["load_in_4bit"] is True
    assert quantization_label(loaded(TorchAoConfig(Int8WeightOnlyConfig()))) == "Int8WeightOnlyConfig (torchao)"
    assert quantization_of(torch.nn.Linear(2, 2)) is None and quantization_label(None) is None


def _cache_folders(text_dir):
    return {folder.name: sorted(folder.glob("*/*.safetensors")) for folder in text_dir.iterdir()}


@pytest.mark.slow
def test_int8_text_encoders_fill_the_text_cache_once_then_leave_and_the_export_carries_them_as_stored(
        tmp_path, stock_diffusers):
    base = build_tiny_flux_pipeline(tmp_path / "flux")
    data, text_dir = build_captioned_folder(tmp_path / "data"), tmp_path / "text"

    def run(name, *flags):
        args = tiny_run_args(base, data, tmp_path / name, steps=1) + [
            "--resolution", "32", "--structure_weight", "0", "--cache_text_embeddings", "--text_cache_dir",
            str(text_dir), "--validation_prompts", "a red square", "--report_to", "none", *flags]
        proc = train_in_process(args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return next(line for line in proc.stdout.splitlines() if line.startswith("text cache: "))

    line = run("int8", "--quantize_text_encoders", "int8")  # a full fine-tune: the export holds the encoders
    labels = "text_encoder: Int8WeightOnlyConfig (torchao), text_encoder_2: Int8WeightOnlyConfig (torchao)"
    assert line.startswith("text cache: 0 of 5 prompts cached in ")
    assert line.endswith(f"; encoding 5 (encoders {labels})")
    (int8_folder, int8_files), = _cache_folders(text_dir).items()
    with safe_open(str(int8_files[0]), "pt") as f:
        assert f.metadata()["text_encoders"] == labels  # the cache records who encoded it
    out = tmp_path / "int8"
    for encoder in ("text_encoder", "text_encoder_2"):  # re-read from the source for the export, bit for bit
        a, b = (load_file(str(p / encoder / "model.safetensors")) for p in (out, base))
        assert a.keys() == b.keys() and all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)
        assert "quantization_config" not in json.loads((out / encoder / "config.json").read_text())
    seen = stock_diffusers.load(out)  # a process without sadm_finetune (or torchao's config) reads it
    assert seen.get("error") is None and seen["cls"] == "FluxPipeline" and not seen["sadm_finetune_imported"], seen

    # A full-precision run on the same captions and cache folder reuses nothing: another key, every prompt encoded.
    line = run("fp32")
    folders = _cache_folders(text_dir)
    assert set(folders) == {int8_folder, line.split(" cached in ")[1].split("/")[-1].split(";")[0]}
    assert line.endswith("; encoding 5") and len(folders) == 2
    fp32_files = next(files for name, files in folders.items() if name != int8_folder)
    int8_embeds, fp32_embeds = (load_file(str(files[0]))["prompt_embeds"] for files in (int8_files, fp32_files))
    with safe_open(str(fp32_files[0]), "pt") as f:
        assert "text_encoders" not in f.metadata()
    assert 0 < (int8_embeds - fp32_embeds).abs().max() < 0.05  # the same prompt, encoded by int8 weights

    # The quantized encoders leave memory once the cache is filled (nothing else holds them).
    config = build_config({"pretrained_model_name_or_path": str(base), "train_data_dir": str(data),
                           "cache_text_embeddings": True, "text_cache_dir": str(text_dir),
                           "quantize_text_encoders": "int8"})
    adapter = load_family(config.model)
    t5 = weakref.ref(adapter.pipeline.text_encoder_2)
    assert quantized_weights(t5()) > 0
    cache = build_text_cache(Accelerator(cpu=True), adapter, ["", "a red square"], config.data, torch.float32, 2)
    gc.collect()
    assert cache.folder.name == int8_folder and t5() is None and adapter.text_encoders() == {}
