"""--train_text_encoder: a LoRA on the CLIP text encoder(s) of SD 1.x/2.x and SDXL, trained with the UNet's.

What a user of the outputs relies on: stock `load_lora_weights` of the diffusers file, and of the kohya file
(diffusers' own kohya converter), and the merged export each give the trained model's text embeddings
(`encode_prompt`) and UNet output; the kohya file has sd-scripts' key names and alphas; an exact resume from a
checkpoint (the encoders' LoRA and their optimizer state in it); caption dropout through the LoRA'd encoder, with
grad; the refusals."""

import shutil

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from checkpoint_weights import _max_diff, _resumed_step
from launch import tiny_run_args, train_in_process
from sadm_finetune.config.run import build_config
from sadm_finetune.tuners.kohya import KOHYA_WEIGHT_NAME
from sadm_finetune.tuners.lora import LORA_WEIGHT_NAME
from sadm_finetune.utils.errors import ConfigError
from tiny_sd import build_captioned_folder, build_tiny_sd_pipeline
from tiny_sdxl import build_tiny_sdxl_pipeline

FAMILIES = {"sd": (build_tiny_sd_pipeline, StableDiffusionPipeline, {"text_encoder": "lora_te"}),
            "sdxl": (build_tiny_sdxl_pipeline, StableDiffusionXLPipeline,
                     {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"})}
PROMPTS = ["a red square", "a blue circle"]
# rank 4 / alpha 8 on the UNet (scale 2), rank 2 / alpha 8 on the text encoders (scale 4): a lost alpha shows
LORA = ["--trainable", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--train_text_encoder",
        "--text_encoder_lora_rank", "2", "--learning_rate", "1e-2", "--text_encoder_lr", "2e-2",
        "--structure_weight", "0", "--no_use_ema", "--report_to", "none"]


def _capture_runs(monkeypatch) -> list:
    import sadm_finetune.train.entry as training

    runs, real = [], training.train_loop
    monkeypatch.setattr(training, "train_loop", lambda run, *rest: runs.append(run) or real(run, *rest))
    return runs


def _embeddings(pipe, family) -> torch.Tensor:
    """The stock pipeline's own `encode_prompt` of PROMPTS (SDXL: its prompt and pooled embeddings, side by side)."""
    with torch.no_grad():
        if family == "sd":
            return pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return torch.cat([embeds.flatten(1), pooled], dim=1)


def _unet_output(unet, family, embeds) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 600])
    with torch.no_grad():
        if family == "sd":
            return unet.eval()(latents, t, encoder_hidden_states=embeds).sample
        hidden, pooled = embeds[:, :-32].view(2, 16, 64), embeds[:, -32:]
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
        return unet.eval()(latents, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


@pytest.mark.parametrize("family", FAMILIES)
def test_every_exported_file_gives_the_trained_text_embeddings_and_unet_output(tmp_path, monkeypatch, family):
    """Mutations that fail here: the text encoders' LoRA left out of a file or of the merged export, its alpha lost
    (rank 2, alpha 8), kohya's prefixes (lora_te / lora_te1 / lora_te2) or `text_model_` wrong, encode_text without
    grad (the encoders would not move), --text_encoder_lr ignored."""
    build, pipeline_class, prefixes = FAMILIES[family]
    base, data, out = build(tmp_path / "base"), build_captioned_folder(tmp_path / "data"), tmp_path / "out"
    runs = _capture_runs(monkeypatch)
    proc = train_in_process(tiny_run_args(base, data, out, steps=2) + LORA + ["--export_merged"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = runs[0]
    assert [g["initial_lr"] for g in run.optimizer.param_groups] == [1e-2, 2e-2]  # the encoders' own group
    encoders = run.adapter.trained_text_encoders
    assert list(encoders) == list(prefixes)
    for encoder in encoders.values():
        assert {m.scaling["default"] for m in encoder.modules() if hasattr(m, "scaling")} == {4.0}  # 8 / 2
        encoder.eval()

    # The trained model: its encoders as the loop encoded (the adapter's encode_text), its UNet
    trained = run.adapter.encode_text(PROMPTS, torch.device("cpu"))
    if family == "sd":
        expected_embeds = trained["prompt_embeds"].detach()
    else:
        expected_embeds = torch.cat([trained["prompt_embeds"].flatten(1), trained["pooled_prompt_embeds"]], 1).detach()
    stock = pipeline_class.from_pretrained(base)
    moved = (expected_embeds - _embeddings(stock, family)).abs().max().item()
    assert moved > 1e-3, moved  # the encoders' LoRA changed the embeddings far beyond the tolerance below
    expected_out = _unet_output(run.unwrapped_denoiser, family, expected_embeds)

    loaded = {}
    for weight_name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe = pipeline_class.from_pretrained(base)
        pipe.load_lora_weights(out, weight_name=weight_name)
        loaded[weight_name] = pipe
    loaded["merged export"] = DiffusionPipeline.from_pretrained(out)
    assert not any("lora" in n for n in loaded["merged export"].text_encoder.state_dict())
    for name, pipe in loaded.items():
        embeds = _embeddings(pipe, family)
        gap = (embeds - expected_embeds).abs().max().item()
        assert gap < 1e-5 * max(1.0, expected_embeds.abs().max().item()), (name, gap)
        gap = (_unet_output(pipe.unet, family, embeds) - expected_out).abs().max().item()
        assert gap < 1e-5 * max(1.0, expected_out.abs().max().item()), (name, gap)

    # The kohya file: sd-scripts' names for the encoders' modules, their alpha; the UNet's beside them
    with safe_open(str(out / KOHYA_WEIGHT_NAME), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    # (SDXL's first encoder: no LoRA on its last layer, whose output SDXL never reads)
    expected = {f"{prefix}_text_model_encoder_layers_{i}_self_attn_{p}.{part}" for prefix in prefixes.values()
                for i in ((0,) if prefix == "lora_te1" else (0, 1)) for p in ("q_proj", "k_proj", "v_proj", "out_proj")
                for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert {k for k in keys if k.startswith("lora_te")} == expected
    assert keys - expected and all(k.startswith("lora_unet_") for k in keys - expected)
    assert set(alphas.values()) == {8.0}
    assert metadata["ss_network_train_unet_only"] == "False" and metadata["ss_text_encoder_lr"] == "0.02"
    # The diffusers file: each part under its component's prefix, its LoRA config (rank, alpha) in the metadata
    with safe_open(str(out / LORA_WEIGHT_NAME), "pt") as f:
        keys = set(f.keys())
    for name in prefixes:
        assert f"{name}.text_model.encoder.layers.0.self_attn.out_proj.lora_B.weight" in keys
    assert "text encoders: LoRA rank 2 on " + ", ".join(prefixes) in proc.stdout
    card = (out / "README.md").read_text()
    assert "with a LoRA on the text encoder(s) too (rank 2, alpha 8.0" in card and "`lora_te...`" in card


def test_resume_restores_the_text_encoders_lora_and_its_optimizer_state(tmp_path):
    """A run resumed from its step-2 checkpoint ends where the straight 4-step run ends: the checkpoint holds the
    encoder's LoRA tensors alone (its own model file) and their AdamW moments. Mutation: the encoder left out of
    the checkpoint (it would resume from its initial LoRA) or its optimizer group lost."""
    base, data = build_tiny_sd_pipeline(tmp_path / "base"), build_captioned_folder(tmp_path / "data")
    extra = LORA + ["--checkpointing_steps", "2", "--lr_scheduler", "constant", "--lr_warmup_steps", "0"]
    full = tmp_path / "full"
    proc = train_in_process(tiny_run_args(base, data, full, steps=4) + extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = full / "checkpoints" / "checkpoint-2"
    encoder_file = load_file(str(ckpt / "model_1.safetensors"))  # the denoiser is model.safetensors
    assert encoder_file and all(".lora_A." in k or ".lora_B." in k for k in encoder_file)
    optimizer = torch.load(ckpt / "optimizer.bin", weights_only=True)
    assert [g["lr"] for g in optimizer["param_groups"]] == [1e-2, 2e-2]
    assert len(optimizer["state"]) == sum(len(g["params"]) for g in optimizer["param_groups"])

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, resumed / "checkpoints" / "checkpoint-2")
    proc = train_in_process(tiny_run_args(base, data, resumed, steps=4) + extra +
                            ["--resume_from_checkpoint", "latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _resumed_step(proc.stdout + proc.stderr) == 2
    a, b = (load_file(str(folder / LORA_WEIGHT_NAME)) for folder in (full, resumed))
    assert set(a) == set(b) and any(k.startswith("text_encoder.") for k in a)
    assert _max_diff(a, b) <= 1e-6
    te = {k: v for k, v in a.items() if k.startswith("text_encoder.") and "lora_B" in k}
    at_checkpoint = {k.replace("text_model.", "").replace("text_encoder.", ""): v for k, v in te.items()}
    moved = max((encoder_file[k.replace(".lora_B.", ".lora_B.default.")] - v).abs().max().item()
                for k, v in at_checkpoint.items())
    assert moved > 1e-4, moved  # steps 3-4 moved the encoder's LoRA: a restart from the base would show


def test_caption_dropout_uses_the_lora_text_encoder_with_grad(tmp_path):
    """Dropped captions get the empty prompt as the LoRA'd encoder encodes it (what diffusers' empty caption before
    encoding computes), and the loss backpropagates into the encoder's LoRA through kept and dropped samples alike;
    under bf16 the frozen encoder is bf16 and its LoRA fp32."""
    from sadm_finetune.families.loading import load_family
    from sadm_finetune.train.builders import prepare_text_encoders
    from sadm_finetune.train.entry import place_frozen_modules

    base = build_tiny_sd_pipeline(tmp_path / "base")
    config = build_config({"pretrained_model_name_or_path": str(base), "train_data_dir": "d", "trainable": "lora",
                           "train_text_encoder": True, "caption_dropout_prob": 0.5})
    adapter = load_family(config.model)
    place_frozen_modules(adapter, torch.device("cpu"), torch.float32)
    base_empty = adapter.encode_text([""], torch.device("cpu"))["prompt_embeds"]  # the base's: what the LoRA changes
    assert not base_empty.requires_grad
    encoders = prepare_text_encoders(config, adapter)
    torch.manual_seed(0)
    for name, p in encoders["text_encoder"].named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a trained LoRA (B starts at zero)
    adapter.trained_text_encoders = encoders
    batch = {"pixel_values": torch.zeros(8, 3, 32, 32), "captions": ["a red square"] * 8}
    g = torch.Generator().manual_seed(3)
    dropped = torch.rand(8, generator=torch.Generator().manual_seed(3)) < 0.5
    assert 0 < dropped.sum() < 8
    embeds = adapter.conditioning(batch, torch.device("cpu"), torch.float32, drop=True, generator=g)
    hidden = embeds["encoder_hidden_states"]
    with torch.no_grad():
        empty = adapter.encode_text([""], torch.device("cpu"))["prompt_embeds"]
    assert torch.allclose(hidden[dropped], empty.expand(int(dropped.sum()), -1, -1), atol=1e-6)
    assert (empty - base_empty).abs().max() > 1e-3
    hidden[dropped].sum().backward()  # the dropped samples alone reach the LoRA
    grads = [p.grad for name, p in encoders["text_encoder"].named_parameters() if "lora_A" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)

    bf16 = load_family(config.model)
    place_frozen_modules(bf16, torch.device("cpu"), torch.bfloat16)
    encoder = prepare_text_encoders(config, bf16)["text_encoder"]
    dtypes = {p.dtype for name, p in encoder.named_parameters() if "lora_" not in name}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in encoder.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_text_encoder_lora_parameter_gets_a_gradient(tmp_path, family):
    """DDP (without find_unused_parameters) stops on a trainable parameter without a gradient: each LoRA tensor of
    the encoders must be reached by the conditioning. SDXL reads its first encoder's penultimate layer only, so that
    encoder's last layer gets no LoRA. With --gradient_checkpointing, on the encoders too. Mutation: LoRA on every
    layer (SDXL's last layer of text_encoder: no grad)."""
    from sadm_finetune.families.loading import load_family
    from sadm_finetune.train.builders import prepare_text_encoders

    base = FAMILIES[family][0](tmp_path / "base")
    config = build_config({"pretrained_model_name_or_path": str(base), "train_data_dir": "d", "trainable": "lora",
                           "train_text_encoder": True, "gradient_checkpointing": True})
    adapter = load_family(config.model)
    adapter.trained_text_encoders = encoders = prepare_text_encoders(config, adapter)
    assert all(encoder.is_activation_checkpointing for encoder in encoders.values())
    torch.manual_seed(0)
    for encoder in encoders.values():
        for name, p in encoder.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
    batch = {"pixel_values": torch.zeros(2, 3, 32, 32), "captions": PROMPTS,
             "original_sizes": torch.tensor([[32, 32]] * 2), "crop_top_lefts": torch.zeros(2, 2, dtype=torch.long),
             "target_sizes": torch.tensor([[32, 32]] * 2)}
    cond = adapter.conditioning(batch, torch.device("cpu"), torch.float32, drop=False)
    sum(v.square().sum() for v in cond.values() if v.requires_grad).backward()
    for component, encoder in encoders.items():
        trainable = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
        assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values()), \
            (component, [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum()])


@pytest.mark.parametrize("options, field", [
    ({"trainable": "lora", "train_text_encoder": True, "cache_text_embeddings": True}, "cache_text_embeddings"),
    ({"train_text_encoder": True}, "train_text_encoder"),  # full fine-tuning of the encoders is not offered
    ({"trainable": "lora", "lora_type": "dora", "train_text_encoder": True}, "train_text_encoder"),
    ({"trainable": "lora", "text_encoder_lr": 1e-5}, "text_encoder_lr"),
    ({"trainable": "lora", "text_encoder_lora_rank": 4}, "text_encoder_lora_rank"),
])
def test_refusals_are_one_line_naming_the_option(options, field):
    with pytest.raises(ConfigError) as error:
        build_config({"pretrained_model_name_or_path": "org/base", "train_data_dir": "d", **options})
    assert error.value.field == field and str(error.value).startswith(f"{field}: ")
    assert len(str(error.value).splitlines()) == 1 and "; " in str(error.value)
