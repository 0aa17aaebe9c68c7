#!/usr/bin/env python
"""Build a small vision encoder for REPA on the digits benchmark: a transformers `Dinov2Model`.

REPA aligns the denoiser's hidden states with a frozen vision encoder's patch features (DINOv2 on
ImageNet in the paper). The digits benchmark runs offline, so this script trains a tiny DINOv2-architecture
ViT (patch 4 on 32x32 images: an 8x8 patch grid) on the scikit-learn digits as a supervised classifier,
then saves its backbone with `save_pretrained` (safetensors) and an image-processor config (mean/std), so
`--repa_encoder <folder>` loads it with `AutoModel.from_pretrained` like any Hub encoder.

Caveat for the evidence: this encoder's features are semantic by supervision on the same digits, a
stand-in for DINOv2's self-supervised ImageNet features; the benchmark's FID uses the bundled digits
classifier, a different network (a CNN) trained separately.

    python scripts/make_digits_encoder.py --output_dir runs/digits-encoder [--steps 600] [--num_threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--num_threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    sys.path.insert(0, str(ROOT))
    from transformers import Dinov2Config, Dinov2ForImageClassification

    from sadm_finetune.data.digits import load_digits_images

    torch.manual_seed(args.seed)
    images, labels = load_digits_images(32)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    y = torch.from_numpy(labels).long()
    config = Dinov2Config(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=128, num_labels=10)
    model = Dinov2ForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    start = time.time()
    for step in range(args.steps):
        idx = torch.from_numpy(rng.choice(len(x), 64, replace=False))
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        accuracy = (model(pixel_values=x).logits.argmax(1) == y).float().mean().item()
    print(f"training-set accuracy {accuracy:.3f}")

    out = Path(args.output_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.dinov2.save_pretrained(tmp, safe_serialization=True)  # the backbone: AutoModel loads a Dinov2Model
    (tmp / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "image_mean": MEAN, "image_std": STD,
        "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255, "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32}}, indent=1))
    if out.exists():
        raise SystemExit(f"{out} exists; remove it or pass another --output_dir")
    os.replace(tmp, out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
