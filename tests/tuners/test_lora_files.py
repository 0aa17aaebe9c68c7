"""The LoRA files a run writes, for every family, with target modules other than the defaults: loaded by the stock
loader a user of the file has (`pipe.load_lora_weights` for SD, SDXL, SD3, Flux and Qwen-Image; diffusers' `PeftAdapterMixin` for DiT
and PixArt; diffusers' kohya loader for the kohya file), the base plus the file computes what the trained model
computes, and no tensor of the file is left out. Also the export dtype and the kohya file's labels."""

import copy
import json

import pytest
import torch
from diffusers import (DiTTransformer2DModel, FluxPipeline, PixArtTransformer2DModel, QwenImagePipeline,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline)
from diffusers.loaders import PeftAdapterMixin
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from sadm_finetune.config.run import ModelConfig, build_config
from sadm_finetune.train.finish import export_dtypes
from sadm_finetune.tuners import lora
from sadm_finetune.tuners.kohya import KOHYA_WEIGHT_NAME
from sadm_finetune.families.loading import load_family, stored_dtype
from tiny_flux import build_tiny_flux_pipeline
from tiny_pipelines import build_tiny_dit_pipeline
from tiny_pixart import build_tiny_pixart_pipeline
from tiny_qwen_image import build_tiny_qwen_image_pipeline
from tiny_sd import build_tiny_sd_pipeline
from tiny_sd3 import build_tiny_sd3_pipeline
from tiny_sdxl import build_tiny_sdxl_pipeline

G = torch.Generator().manual_seed(0)
T = torch.tensor([10, 600])


def _conditioning(family):
    """Fixed denoiser inputs per family: (noisy latents, conditioning as the adapter's `predict` takes it)."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    if family == "sd":
        return latents, {"encoder_hidden_states": torch.randn(2, 16, 32, generator=g)}
    if family == "sdxl":
        return latents, {"encoder_hidden_states": torch.randn(2, 16, 64, generator=g),
                         "text_embeds": torch.randn(2, 32, generator=g),
                         "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    if family == "sd3":
        return latents, {"encoder_hidden_states": torch.randn(2, 24, 64, generator=g),
                         "pooled_projections": torch.randn(2, 64, generator=g)}
    if family == "flux":
        return latents, {"encoder_hidden_states": torch.randn(2, 24, 32, generator=g),
                         "pooled_projections": torch.randn(2, 32, generator=g), "guidance": torch.tensor([3.5, 3.5])}
    if family == "qwen":  # the second prompt padded: its mask reaches the transformer
        return latents, {"encoder_hidden_states": torch.randn(2, 12, 32, generator=g),
                         "encoder_hidden_states_mask": torch.tensor([[1] * 12, [1] * 7 + [0] * 5])}
    if family == "dit":
        return latents, {"class_labels": torch.tensor([0, 1])}
    return torch.randn(2, 4, 4, 4, generator=g), {"encoder_hidden_states": torch.randn(2, 12, 32, generator=g),
                                                  "encoder_attention_mask": torch.ones(2, 12, dtype=torch.long)}


# family, base builder, non-default targets (convolutions among them: SD's proj_in, DiT's patch embedding)
FAMILIES = {
    "sd": (build_tiny_sd_pipeline, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]),
    "sdxl": (build_tiny_sdxl_pipeline, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]),
    "sd3": (build_tiny_sd3_pipeline, ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "proj_out", "ff.net.2"]),
    "flux": (build_tiny_flux_pipeline, ["to_q", "to_k", "add_v_proj", "to_add_out", "proj_mlp", "proj_out",
                                        "ff_context.net.2"]),
    "qwen": (build_tiny_qwen_image_pipeline, ["to_q", "to_k", "add_v_proj", "to_add_out", "img_mlp.net.2",
                                              "txt_mlp.net.0.proj", "img_mod.1"]),
    "dit": (build_tiny_dit_pipeline, ["attn1.to_q", "attn1.to_v", "proj_out_2", "pos_embed.proj"]),
    "pixart": (build_tiny_pixart_pipeline, ["to_q", "to_k", "to_v", "to_out.0", "proj_out", "linear_1"]),
}
STOCK = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline,
         "flux": FluxPipeline, "qwen": QwenImagePipeline}
DENOISERS = {"dit": DiTTransformer2DModel, "pixart": PixArtTransformer2DModel}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-files")
    return {name: build(root / name) for name, (build, _) in FAMILIES.items()}


def _trained(base, family, tmp_path, **options):
    """The family's adapter, its denoiser with a random (trained-looking) LoRA on the non-default targets, and the
    files `save_lora_weights` wrote for it into tmp_path."""
    model = ModelConfig(pretrained_model_name_or_path=str(base), trainable="lora", lora_rank=4, lora_alpha=8.0,
                        lora_target_modules=FAMILIES[family][1], **options)
    adapter = load_family(model)
    config = lora.make_lora_config(model, adapter.lora_target_modules)
    trained = lora.attach_lora(copy.deepcopy(adapter.denoiser), config).eval()
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(std=0.1, generator=G)
    state = lora.lora_state_dict(trained)
    written = adapter.save_lora_weights(tmp_path, state, lora.lora_metadata(config), {"modelspec.title": "t"})
    return adapter, trained, state, written


def _out(adapter, model, family):
    latents, cond = _conditioning(family)
    with torch.no_grad():
        return adapter.predict(model.eval(), latents, T, cond).model_pred


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_loaders_apply_every_lora_tensor_of_non_default_targets(bases, tmp_path, family):
    adapter, trained, state, written = _trained(bases[family], family, tmp_path)
    assert written["diffusers"] == lora.LORA_WEIGHT_NAME and not list(tmp_path.glob(".tmp-*"))
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state} >= {t.rsplit(".", 1)[-1]
                                                                       for t in FAMILIES[family][1]}
    if family in STOCK:  # the pipeline's own loader, on a fresh base, reading the folder
        pipe = STOCK[family].from_pretrained(bases[family])
        pipe.load_lora_weights(tmp_path)
        loaded, name = getattr(pipe, adapter.denoiser_name), "default_0"
    else:  # what the model card shows: diffusers' PeftAdapterMixin on the denoiser class
        cls = type("WithLoRA", (DENOISERS[family], PeftAdapterMixin), {})
        loaded, name = cls.from_pretrained(bases[family], subfolder="transformer"), "default"
        loaded.load_lora_adapter(str(tmp_path), weight_name=lora.LORA_WEIGHT_NAME, prefix="transformer",
                                 adapter_name=name, use_safetensors=True)
    applied = get_peft_model_state_dict(loaded, adapter_name=name)
    assert applied.keys() == state.keys()  # every tensor of the file reached a module, and nothing else
    assert all(torch.equal(applied[k], state[k]) for k in state)
    expected, got = _out(adapter, trained, family), _out(adapter, loaded, family)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (expected - _out(adapter, adapter.denoiser, family)).abs().max() > 1e-3  # the LoRA matters


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_file_is_applied_whole_by_diffusers_and_labelled_for_the_uis(bases, tmp_path, family):
    adapter, trained, state, written = _trained(bases[family], family, tmp_path)
    assert written == {"diffusers": lora.LORA_WEIGHT_NAME, "kohya": KOHYA_WEIGHT_NAME}  # both by default
    pipe = STOCK[family].from_pretrained(bases[family])
    pipe.load_lora_weights(tmp_path, weight_name=KOHYA_WEIGHT_NAME)
    applied = [n for n, _ in pipe.unet.named_parameters() if ".lora_A." in n]
    assert len(applied) * 2 == len(state)
    torch.testing.assert_close(_out(adapter, pipe.unet, family), _out(adapter, trained, family), rtol=1e-5, atol=1e-6)
    with safe_open(str(tmp_path / KOHYA_WEIGHT_NAME), "pt") as f:
        meta = f.metadata()
        alphas = {f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")}
    assert alphas == {8.0} and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.title"] == "t" and meta["modelspec.implementation"] == "diffusers"
    if family == "sdxl":  # A1111 / Forge list it under SDXL by this prefix
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    else:
        assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert meta["modelspec.prediction_type"] == "epsilon"


def test_kohya_labels_tell_sd2_and_v_prediction_apart(bases):
    adapter = load_family(ModelConfig(pretrained_model_name_or_path=str(bases["sd"])))
    adapter.pipeline.unet.register_to_config(cross_attention_dim=1024)  # OpenCLIP ViT-H's width: SD 2.x
    adapter.pipeline.scheduler.register_to_config(prediction_type="v_prediction")
    assert adapter.kohya_labels() == {"ss_base_model_version": "sd_v2_v", "ss_v2": "True",
                                      "modelspec.architecture": "stable-diffusion-v2-768-v/lora",
                                      "modelspec.prediction_type": "v"}


def test_the_exports_own_check_refuses_a_file_the_loader_applies_in_part(bases, tmp_path):
    """The mixed-key file diffusers' `convert_state_dict_to_diffusers` makes of these targets (`to_q.lora.down`
    beside `proj_in.lora_A`): the loader keeps one key style, and the export's sampling pipeline says so."""
    from diffusers.utils import convert_state_dict_to_diffusers

    adapter, _, state, _ = _trained(bases["sd"], "sd", tmp_path, lora_export_format="diffusers")
    mixed = convert_state_dict_to_diffusers(state)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "mixed", unet_lora_layers=mixed)
    with pytest.raises(RuntimeError, match="left 64 of its 80 LoRA tensors unused"):
        adapter.lora_pipeline(tmp_path / "mixed", lora.LORA_WEIGHT_NAME)
    assert adapter.lora_pipeline(tmp_path, lora.LORA_WEIGHT_NAME).unet is not adapter.denoiser


def test_export_dtype_defaults_to_the_bases_own_and_reaches_both_files(bases, tmp_path):
    half = tmp_path / "fp16-base"
    StableDiffusionPipeline.from_pretrained(bases["sd"]).to(torch.float16).save_pretrained(half)
    assert stored_dtype(ModelConfig(pretrained_model_name_or_path=str(half)), "unet") == torch.float16
    assert stored_dtype(ModelConfig(pretrained_model_name_or_path=str(bases["sd"])), "unet") == torch.float32
    for chosen, expected in ((None, torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        config = build_config({"pretrained_model_name_or_path": str(half), "train_data_dir": "d", "trainable": "lora",
                               "export_dtype": chosen})
        adapter = load_family(config.model)
        dtypes = export_dtypes(config, adapter)
        assert set(dtypes) == {"unet", "vae", "text_encoder"} and set(dtypes.values()) == {expected}
        out = tmp_path / str(chosen)
        state = {k: v.float() for k, v in lora.lora_state_dict(
            lora.attach_lora(copy.deepcopy(adapter.denoiser), lora.make_lora_config(config.model, ("to_q",)))).items()}
        adapter.save_lora_weights(out, lora.cast_state(state, dtypes["unet"]),
                                  lora.lora_metadata(lora.make_lora_config(config.model, ("to_q",))))
        for name in (lora.LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
            raw = (out / name).read_bytes()
            header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
            kinds = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
            assert kinds == {{torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[expected]}, name
