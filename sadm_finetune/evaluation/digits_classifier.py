"""A small CNN that classifies 32x32 RGB digits: the feature space and label judge of the digits demo.

Inception-v3 features say little about 32x32 digits and need a download; this network is trained on
``demo_data.load_digits_images(32)`` by ``scripts/train_digits_classifier.py`` and ships with the
package (``sadm_finetune/assets/digits-classifier``), so the demo's FID needs no network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class ClassifierOutput(BaseOutput):
    """``features`` (B, D): pooled penultimate activations; ``logits`` (B, num_classes)."""

    features: torch.Tensor
    logits: torch.Tensor


class DigitsClassifier(ModelMixin, ConfigMixin):
    """Conv stages (two 3x3 conv + BN + ReLU, then 2x2 max-pool each), global average pool, linear head.

    The pooled activations play the role of Inception's pool3 features; the head gives class logits.
    Inputs are images in [-1, 1], ``(B, in_channels, sample_size, sample_size)``.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        block_out_channels: tuple[int, ...] = (16, 32, 64),
        dropout: float = 0.2,
        sample_size: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels in block_out_channels:
            for _ in range(2):
                layers += [
                    nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                channels = out_channels
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> ClassifierOutput:
        features = self.body(pixel_values).mean(dim=(2, 3))  # (B, C) global average pool
        logits = self.head(self.head_dropout(features))
        return ClassifierOutput(features=features, logits=logits)

