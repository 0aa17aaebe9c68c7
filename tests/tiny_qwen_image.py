"""A tiny random-init QwenImagePipeline built in code (no network), after diffusers' own Qwen-Image pipeline tests
(`QwenImagePipelineTesterConfig.get_dummy_components`), with an offline Qwen2 tokenizer.

The tokenizer is a byte-level BPE trained here on the pipeline's prompt template and a few words, with Qwen2's
pre-tokenizer and its chat tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`): every template word is one token,
so the system prompt is the same 34 tokens as with the real tokenizer, and `prompt_template_encode_start_idx` drops
exactly it (checked when built). Qwen-Image's traits are on: the causal 3D VAE with per-channel `latents_mean` /
`latents_std` (not 0 and 1), Qwen-Image's scheduler config (dynamic exponential shift, `shift_terminal`), packed 2x2
latents, a Qwen2.5-VL text encoder with multimodal rotary sections."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Qwen/Qwen-Image scheduler/scheduler_config.json
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9,
                 num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
                 time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True,
                 use_exponential_sigmas=False, use_karras_sigmas=False)
Z_DIM = 4
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075]  # the first four channels of Qwen-Image's VAE
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558]
TEXT_WIDTH = 32  # Qwen2.5-VL hidden size = the transformer's joint_attention_dim
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
WORDS = ("a red square blue circle green triangle yellow star photo of dog cat on the grass small large bright dark "
         "image picture")


def tiny_qwen_tokenizer():
    """A Qwen2Tokenizer whose byte-level BPE knows the template's words and the test captions' words whole."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    corpus = [TEMPLATE, WORDS, " ".join(WORDS.split()).upper(), "0123456789 ,.:;!?'\"()-"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                               model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL[1:])})
    return tokenizer


# QwenImagePipeline.prompt_template_encode (set in its __init__; the builder checks they agree)
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")


def build_tiny_qwen_image_pipeline(path: str | Path, seed: int = 0) -> Path:
    """32x32x3 images <-> 8x8x4 latents (the VAE downsamples 4x: 2 ** len(temperal_downsample); packed 2x2: 4x4
    tokens of 16 channels); a 2-block MMDiT (width 32, rotary axes 8+4+4); a 2-layer Qwen2.5-VL text encoder of
    width 32 with a 2-block vision tower (unused for text, as in the real model)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * Z_DIM, out_channels=Z_DIM, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_WIDTH, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=Z_DIM, z_dim=Z_DIM, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=LATENTS_MEAN,
                                 latents_std=LATENTS_STD)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": TEXT_WIDTH, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": TEXT_WIDTH},
        hidden_size=TEXT_WIDTH, vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = QwenImagePipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
                             vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    if pipe.prompt_template_encode != TEMPLATE:
        raise RuntimeError("QwenImagePipeline's prompt template changed: update tiny_qwen_image.TEMPLATE")
    prefix = TEMPLATE.split("{}")[0]
    n = len(tokenizer(prefix).input_ids)
    if n != pipe.prompt_template_encode_start_idx:
        raise RuntimeError(f"the tiny tokenizer splits the system prompt into {n} tokens, the pipeline drops "
                           f"{pipe.prompt_template_encode_start_idx}")
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
