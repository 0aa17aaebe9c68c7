"""Stable Diffusion family (1.x / 2.x): `UNet2DConditionModel` + CLIP text encoder + tokenizer, text-conditioned.

Only this adapter knows about text: it turns a batch's captions (or their cached embeddings,
--cache_text_embeddings) into `encoder_hidden_states`, with caption dropout (the empty prompt) for
classifier-free guidance. Epsilon and v-prediction come from the scheduler config, as for every family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from torch import nn

from ..config.run import RunConfig
from ..utils.errors import ConfigError
from .base import CaptionedFamily, FamilyAdapter, ModelOutput, batch_size, drop_to_empty, refuse_options



class StableDiffusionAdapter(CaptionedFamily, FamilyAdapter):
    family = "stable-diffusion"
    display_name = "Stable Diffusion"
    pipeline_classes = ("StableDiffusionPipeline",)
    pipeline_class: type[DiffusionPipeline] = StableDiffusionPipeline  # exported; its LoRA loader reads our file
    denoiser_name = "unet"
    capabilities = frozenset({"block_hidden_states"})  # the UNet's stages, flattened to tokens
    capability_gaps = {**CaptionedFamily.capability_gaps, "class_label_blocks": "{name} has a UNet"}
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention projections
    # The safety checker (1.2 GB) plays no part in training, and the export is saved without it.
    load_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    kohya_lora = True
    stock_lora_loader = True

    @property
    def text_encoder(self) -> nn.Module | None:
        """None once released after --cache_text_embeddings."""
        return self.pipeline.text_encoder

    @property
    def tokenizer(self) -> Any:
        return self.pipeline.tokenizer

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        super().check_config(config)
        refuse_options(
            *cls.text_refusals(config),
            (config.model.pos_embed_transfer is not None, "pos_embed_transfer",
             "Stable Diffusion's UNet has no positional embedding to transfer",
             "drop --pos_embed_transfer (--resolution alone sets its training size)"),
        )

    def check_resolution(self, resolution: int) -> None:
        # StableDiffusionPipeline's own rule: the UNet forwards upsample sizes, so any whole latent size works.
        if resolution % self.vae_scale_factor:
            raise ConfigError("resolution", f"{resolution} is not divisible by the VAE factor {self.vae_scale_factor}",
                              f"use a multiple of {self.vae_scale_factor}, e.g. {self.default_resolution()}")

    def aspect_ratio_bucket_multiple(self) -> int:
        # The UNet halves the latent once per down block after the first: sides that divide evenly (64 pixels for
        # SD 1.x / 2.x) never take the odd-size upsampling path.
        return self.vae_scale_factor * 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, *self.text_encoders().values()]

    def prepare_training(self) -> None:
        """Nothing to switch off: caption dropout happens in `conditioning`, the text encoder stays frozen."""

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Prompts -> {"prompt_embeds": (B, tokens, dim)} CLIP hidden states, as StableDiffusionPipeline computes
        them."""
        input_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids
        return {"prompt_embeds": self.text_encoder(input_ids.to(device))[0]}

    def dropped_text_embeddings(self, batch: dict[str, Any], device: torch.device, drop: bool,
                                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The batch's `encode_text` outputs (B, ...), the empty prompt's in place of a caption with probability
        `caption_dropout_prob` when `drop`."""
        embeds, empty = self.text_embeddings(batch, device)  # (B, ...) each; the empty prompt's (1, ...)
        p = self.config.caption_dropout_prob
        if drop and p > 0:
            dropped = torch.rand(batch_size(batch), device=device, generator=generator) < p
            embeds = drop_to_empty(embeds, empty, dropped)
        return embeds

    def conditioning(self, batch: dict[str, Any], device: torch.device, weight_dtype: torch.dtype,
                     drop: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        # The batch's geometry (original size, crop) plays no part: SD 1.x / 2.x has no micro-conditioning.
        embeds = self.dropped_text_embeddings(batch, device, drop, generator)
        return {"encoder_hidden_states": embeds["prompt_embeds"]}

    def predict(self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> ModelOutput:
        out = denoiser(noisy_latents, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"]).sample
        return ModelOutput(out)

    def disc_class_labels(self, conditioning: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def feature_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        # The UNet's stages in depth order; outputs are (B, C, h, w) feature maps.
        return [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]

    def export_pipeline(self, denoiser: nn.Module) -> DiffusionPipeline:
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=denoiser,
            scheduler=self.pipeline.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )

    def sample_grid(self, pipeline: DiffusionPipeline, num_per_row: int, num_inference_steps: int,
                    guidance_scale: float, seed: int, conditions: list[str] | None) -> np.ndarray:
        rows = self.prompt_rows(pipeline, conditions, num_per_row)
        return self._sample_rows(pipeline, rows, num_inference_steps, guidance_scale, seed)

    def save_lora_weights(self, output_dir: Path, lora_state_dict: dict[str, torch.Tensor],
                          adapter_metadata: dict[str, Any], kohya_metadata: dict[str, str] | None = None
                          ) -> dict[str, str]:
        """The stock LoRA file (`FamilyAdapter.save_lora_weights`: peft keys under the `unet.` prefix, which the
        pipeline's `load_lora_weights` reads whole) and/or the kohya file (models/kohya.py), as `lora_formats` says.

        Not diffusers' `convert_state_dict_to_diffusers`: it renames only the modules its table knows (`to_q.lora_A`
        -> `to_q.lora.down`, not `proj_in`), and a file that mixes the two key styles loses one of them in
        `load_lora_adapter`, which picks the style from the first key."""
        formats = self.lora_formats(self.config)
        written = super().save_lora_weights(output_dir, lora_state_dict, adapter_metadata) if "diffusers" in formats \
            else {}
        if "kohya" in formats:
            from ..tuners.kohya import save_kohya_lora

            labels = {**self.kohya_labels(), **(kohya_metadata or {})}
            written["kohya"] = save_kohya_lora(output_dir, lora_state_dict, adapter_metadata, labels).name
        return written

    def kohya_labels(self) -> dict[str, str]:
        """What kohya's sd-scripts record about the base in a LoRA file (train_network.py, library/sai_model_spec.py),
        which A1111 / Forge read to file the LoRA under its model version: SD 2.x when the UNet cross-attends to
        1024-wide text states (OpenCLIP ViT-H), else SD 1.x; v-prediction from the scheduler."""
        v2 = self.denoiser.config.cross_attention_dim == 1024
        v_pred = self.pipeline.scheduler.config.get("prediction_type") == "v_prediction"
        version = ("sd_v2" if v2 else "sd_v1") + ("_v" if v_pred else "")
        architecture = ("stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512") if v2 \
            else "stable-diffusion-v1"
        return {"ss_base_model_version": version, "ss_v2": str(v2), "modelspec.architecture": f"{architecture}/lora",
                "modelspec.prediction_type": "v" if v_pred else "epsilon"}

    def lora_pipeline(self, output_dir: Path, weight_name: str) -> DiffusionPipeline:
        """The base pipeline (a fresh base denoiser beside the frozen components) with the LoRA file `weight_name` of
        `output_dir` applied by the pipeline's own `load_lora_weights`: what a user of the file samples. Raises unless
        every LoRA tensor of the file sits in the denoiser (a loader may inject a module and leave the file's
        tensor for it unread, with only a warning)."""
        from collections import Counter

        from diffusers.utils import logging as diffusers_logging
        from safetensors.torch import load_file

        pipeline = self.export_pipeline(self.load_component(self.denoiser_name))
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder" and the like: checked below
        try:
            pipeline.load_lora_weights(str(output_dir), weight_name=weight_name)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        in_file = {k: v for k, v in load_file(str(Path(output_dir) / weight_name)).items() if not k.endswith(".alpha")}
        dtype = next(iter(in_file.values())).dtype

        def fingerprints(tensors) -> Counter:  # each tensor's bytes in the file's dtype: a multiset to compare
            return Counter(t.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes()
                           for t in tensors)

        denoiser = getattr(pipeline, self.denoiser_name)
        loaded = [p for name, p in denoiser.named_parameters() if ".lora_A." in name or ".lora_B." in name]
        missing = fingerprints(in_file.values()) - fingerprints(loaded)
        if missing:
            raise RuntimeError(f"{weight_name}: diffusers' load_lora_weights left {sum(missing.values())} of its "
                               f"{len(in_file)} LoRA tensors unused")
        return pipeline

    def lora_usage(self, base: str, repo: str, weight_name: str, call: str) -> str:
        name = self.pipeline_class.__name__
        imports, vae_line, vae_arg = name, "", ""
        if self.config.pretrained_vae_model_name_or_path:  # the run's separate VAE, as training and samples used it
            from .vae import separate_vae_source

            source, kwargs = separate_vae_source(self.config)
            vae_cls = type(self.vae).__name__
            options = "".join(f", {k}={kwargs[k]!r}" for k in ("subfolder", "revision") if kwargs.get(k))
            imports, vae_arg = f"{vae_cls}, {name}", ", vae=vae"
            vae_line = f'vae = {vae_cls}.from_pretrained("{source}"{options}, dtype=dtype)\n'
        return f"""import torch
from diffusers import {imports}

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
{vae_line}pipe = {name}.from_pretrained("{base}"{self.base_load_options()}{vae_arg}, dtype=dtype).to(device)
pipe.load_lora_weights("{repo}", weight_name="{weight_name}")
{call}
image.save("sample.png")"""

    def card_tags(self) -> list[str]:
        return [self.family, "text-to-image"]
