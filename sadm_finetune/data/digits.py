"""scikit-learn's digits (1,797 8x8 images, 10 classes) as RGB images: the one offline image set.

The demo base pipeline, the demo fine-tune and the offline evaluation all read digits through here,
so every one of them sees the same pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

DIGITS_NAME = "builtin:digits"


def load_digits_images(resolution: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)``: uint8 ``(N, resolution, resolution, 3)`` and int64 ``(N,)``.

    The 8x8 grey levels (0..16) are stretched to 0..255 and upscaled bicubically.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # (N, 8, 8)
    images = np.stack(
        [
            np.asarray(Image.fromarray(img, mode="L").resize((resolution, resolution), Image.BICUBIC))
            for img in small
        ]
    )
    images = np.repeat(images[..., None], 3, axis=-1)  # (N, H, W, 3)
    return images, digits.target.astype(np.int64)
