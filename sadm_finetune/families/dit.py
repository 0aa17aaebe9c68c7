"""DiT family: `DiTPipeline` = `DiTTransformer2DModel` + `AutoencoderKL` + scheduler, class-conditional."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline, DiTPipeline
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from ..utils.errors import ConfigError
from ..config.run import RunConfig, TrainingConfig
from .base import FamilyAdapter, ModelOutput, batch_size

# DiTPipeline hard-codes this id for the unconditional branch of classifier-free guidance.
DIT_NULL_CLASS_ID = 1000


def dit_at_sample_size(transformer: nn.Module, sample_size: int) -> nn.Module:
    """`transformer` rebuilt by its own class from its config with `sample_size` changed, holding the same weight
    tensors: its fixed sin-cos positional embedding is then the one a stock DiT of that size computes (the base's
    positions 0, 1, 2, ... continued: "extend", docs/design.md §7), and the saved model reloads to the same module."""
    if transformer.config.sample_size == sample_size:
        return transformer
    cls = type(transformer)
    init_keys = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in transformer.config.items() if k in init_keys}  # legacy Transformer2DModel keys dropped
    device = next(transformer.parameters()).device
    with init_empty_weights():  # parameters on the meta device; the positional-embedding buffer is computed for real
        resized = cls.from_config({**config, "sample_size": sample_size})
    if "_name_or_path" in transformer.config:
        resized.register_to_config(_name_or_path=transformer.config._name_or_path)
    resized.load_state_dict(transformer.state_dict(), strict=True, assign=True)
    return resized.to(device).train(transformer.training)


class DiTAdapter(FamilyAdapter):
    family = "dit"
    display_name = "DiT"
    pipeline_classes = ("DiTPipeline",)
    denoiser_name = "transformer"
    # Attention and MLP projections of every block (not the adaLN modulation, which carries the class signal).
    lora_target_modules = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
    # Class-conditional, DDPM with learned sigma; --pos_embed_transfer extend rebuilds its sin-cos embedding; square
    # images only; no stock LoRA loader for DiTPipeline in diffusers (the merged export is always written).
    capabilities = frozenset({"class_labels", "ddpm", "learned_sigma", "pos_embed_transfer", "difffit",
                              "block_hidden_states", "class_label_blocks"})
    capability_gaps = {"aspect_ratio_buckets": "{name} trains on square images only (DiTTransformer2DModel "
                       "unpatchifies a square token grid, and DiTPipeline samples sample_size x sample_size)"}
    # Latent sizes of the pretrained transformer and of --resolution, once set_resolution ran.
    base_sample_size: int | None = None
    trained_sample_size: int | None = None

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        super().check_config(config)
        if config.model.pos_embed_transfer == "interpolate":
            # DiTPipeline samples at transformer.config.sample_size, where a DiTTransformer2DModel places its tokens
            # at positions 0..n-1; only Transformer2DModel has interpolation_scale, and diffusers loads a saved one
            # with DiT's norm as DiTTransformer2DModel, dropping it (tests/families/test_dit.py pins this).
            raise ConfigError(
                "pos_embed_transfer",
                "interpolate cannot be exported: a stock DiTPipeline at the new sample_size always extends the base's "
                "positions (DiTTransformer2DModel has no interpolation_scale)",
                "use --pos_embed_transfer extend (docs/design.md §7)",
            )

    def check_data(self, data) -> None:
        self.check_class_ids(data.max_class_id())

    def validation_conditions(self, training: TrainingConfig) -> list[int] | None:
        return training.validation_class_labels

    @property
    def num_classes(self) -> int:
        return self.denoiser.config.num_embeds_ada_norm

    @property
    def id2label(self) -> dict[int, str] | None:
        id2label = getattr(self.pipeline.config, "id2label", None)
        return {int(k): v for k, v in id2label.items()} if id2label else None

    def set_resolution(self, resolution: int) -> None:
        super().set_resolution(resolution)
        self.base_sample_size = self.base_sample_size or self.denoiser.config.sample_size
        self.trained_sample_size = resolution // self.vae_scale_factor
        self.pipeline.transformer = dit_at_sample_size(self.denoiser, self.trained_sample_size)

    def denoiser_config_overrides(self) -> dict[str, Any]:
        if self.trained_sample_size in (None, self.base_sample_size):
            return {}
        return {"sample_size": self.trained_sample_size}

    def load_component(self, name: str) -> nn.Module:
        module = super().load_component(name)
        if name == self.denoiser_name and self.trained_sample_size is not None:
            return dit_at_sample_size(module, self.trained_sample_size)  # e.g. the LoRA export's fresh base
        return module

    def check_class_ids(self, max_class_id: int | None) -> None:
        if max_class_id is None:
            return
        if max_class_id >= self.num_classes:
            raise ConfigError(
                "label_column",
                f"class id {max_class_id} is out of range for this DiT ({self.num_classes} classes)",
                f"use class ids 0..{self.num_classes - 1}",
            )

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae]

    def _label_embeddings(self) -> list[LabelEmbedding]:
        return [m for m in self.denoiser.modules() if isinstance(m, LabelEmbedding)]

    def prepare_training(self) -> None:
        # diffusers' DiT has one label embedding per block, each dropping labels on its own in train
        # mode; we drop once per sample instead (the null id DiTPipeline uses), so all blocks agree.
        embeddings = self._label_embeddings()
        null_ids = {m.num_classes for m in embeddings}
        if null_ids != {DIT_NULL_CLASS_ID} or any(m.embedding_table.num_embeddings <= m.num_classes for m in embeddings):
            raise ConfigError(
                "pretrained_model_name_or_path",
                f"this DiT has no null-class embedding at id {DIT_NULL_CLASS_ID} (found {sorted(null_ids)})",
                "use a DiT with num_embeds_ada_norm=1000 and class dropout, as DiTPipeline expects",
            )
        for m in embeddings:
            m.dropout_prob = 0.0

    def conditioning(self, batch: dict[str, Any], device: torch.device, weight_dtype: torch.dtype,
                     drop: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        labels = batch.get("class_labels")
        if labels is None:  # unconditional data: every sample is the null class
            labels = torch.full((batch_size(batch),), DIT_NULL_CLASS_ID, dtype=torch.long)
        labels = labels.to(device)
        if drop and self.config.class_dropout_prob > 0:
            dropped = torch.rand(labels.shape, device=device, generator=generator) < self.config.class_dropout_prob
            labels = torch.where(dropped, torch.full_like(labels, DIT_NULL_CLASS_ID), labels)
        return {"class_labels": labels}

    def predict(self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> ModelOutput:
        out = denoiser(noisy_latents, timestep=timesteps, class_labels=conditioning["class_labels"]).sample
        return self.split_output(out)

    def feature_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        return list(denoiser.transformer_blocks)  # outputs: (B, tokens, hidden) token states

    def export_pipeline(self, denoiser: nn.Module) -> DiffusionPipeline:
        pipeline = DiTPipeline(transformer=denoiser, vae=self.vae, scheduler=self.pipeline.scheduler,
                               id2label=self.id2label)
        if self.id2label:
            pipeline.register_to_config(id2label=self.id2label)  # not saved unless registered
        return pipeline

    def resolved_conditions(self, class_labels: list[int] | None) -> list[int]:
        if class_labels is None:
            known = sorted(self.id2label) if self.id2label else list(range(self.num_classes))
            return known[:10]
        return list(class_labels)

    def condition_text(self, class_label: int) -> str:
        name = (self.id2label or {}).get(class_label)
        return f"class {class_label}" + (f" ({name})" if name else "")

    def example_call(self, class_label: int, num_inference_steps: int, guidance_scale: float, seed: int) -> str:
        return (f"image = pipe(class_labels=[{class_label}], num_inference_steps={num_inference_steps}, "
                f"guidance_scale={guidance_scale}, generator=torch.manual_seed({seed})).images[0]")

    def sample_grid(self, pipeline: DiffusionPipeline, num_per_row: int, num_inference_steps: int,
                    guidance_scale: float, seed: int, class_labels: list[int] | None) -> np.ndarray:
        rows = [{"class_labels": [label] * num_per_row} for label in self.resolved_conditions(class_labels)]
        return self._sample_rows(pipeline, rows, num_inference_steps, guidance_scale, seed)
