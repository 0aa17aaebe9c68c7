"""Feature extractors: uint8 images ``(N, H, W, 3)`` -> float features ``(N, D)`` for the metrics.

Every extractor has a ``name`` (stored in reference-statistics caches, so that features from two
different networks are never compared) and is called on a numpy batch of any size; it batches
internally. ``build_feature_extractor`` turns the ``--features`` choice of ``sadm-eval`` into one.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DIGITS_CLASSIFIER_PATH = Path(__file__).resolve().parents[1] / "assets" / "digits-classifier"
INCEPTION_FILENAME = "inception-2015-12-05.pt"
# TorchScript Inception-v3 of the TF FID graph, as used by StyleGAN2-ADA, EDM and clean-fid.
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILENAME}"
INCEPTION_PATH_ENV = "SADM_INCEPTION_PATH"


class FeatureExtractor(Protocol):
    """What the metrics need from a feature network."""

    name: str

    def __call__(self, images: np.ndarray) -> np.ndarray:  # uint8 (N, H, W, 3) -> float (N, D)
        ...


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def _batches(images: np.ndarray, batch_size: int, device: torch.device):
    """Yield uint8 NCHW tensors on ``device``."""
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).to(device)


def _output_features(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "features", None) is not None:
        return output.features
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(
        f"feature module returned {type(output).__name__}; return a tensor, a tuple or an object with .features"
    )


class ModuleFeatures:
    """Wrap any torch module that maps images in [-1, 1], ``(B, 3, H, W)``, to features.

    The module may return a tensor, a tuple (first item used) or an output with ``.features``
    (such as ``ClassifierOutput``); anything beyond two dimensions is flattened. ``resize`` resamples
    the images (bilinear, antialiased) to the square size the module was trained on.
    """

    def __init__(
        self,
        module: nn.Module,
        name: str,
        resize: int | None = None,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ) -> None:
        self.name = name
        self.resize = resize
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()

    def _pixel_values(self, batch: torch.Tensor) -> torch.Tensor:
        pixel_values = batch.float() / 127.5 - 1.0  # uint8 -> [-1, 1], the diffusers convention
        if self.resize is not None and pixel_values.shape[-2:] != (self.resize, self.resize):
            pixel_values = F.interpolate(
                pixel_values, size=(self.resize, self.resize), mode="bilinear", antialias=True, align_corners=False
            )
        return pixel_values

    @torch.inference_mode()
    def _outputs(self, images: np.ndarray):
        for batch in _batches(_check_images(images), self.batch_size, self.device):
            yield self.module(self._pixel_values(batch))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        features = [_output_features(out).flatten(1).float().cpu() for out in self._outputs(images)]
        return torch.cat(features).numpy()


class ClassifierFeatures(ModuleFeatures):
    """A classifier whose output has ``.features`` and ``.logits``: features for FID, labels for accuracy."""

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predicted class ids, ``(N,)`` int64."""
        predictions = []
        for out in self._outputs(images):
            if getattr(out, "logits", None) is None:
                raise TypeError(f"{self.name}: the module's output has no .logits, so it cannot predict labels")
            predictions.append(out.logits.argmax(dim=1).cpu())
        return torch.cat(predictions).numpy().astype(np.int64)


def _weights_digest(folder: Path) -> str:
    """Short hash of a model folder's weights, so a retrained model gets a new feature-space name."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.read_bytes())
    return digest.hexdigest()[:8]


def _classifier_class(class_name: str) -> type:
    from sadm_finetune.evaluation import digits_classifier

    if hasattr(digits_classifier, class_name):
        return getattr(digits_classifier, class_name)
    import diffusers
    from diffusers.models.modeling_utils import ModelMixin

    cls = getattr(diffusers, class_name, None)
    if isinstance(cls, type) and issubclass(cls, ModelMixin):
        return cls
    raise ValueError(
        f"unknown model class {class_name!r}; load it in Python and wrap it with "
        "sadm_finetune.evaluation.features.ClassifierFeatures(model, name)"
    )


def load_classifier(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a classifier saved with ``save_pretrained`` (a ``ModelMixin`` folder, safetensors only)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a folder written by save_pretrained")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    if class_name is None:
        raise ValueError(f"{config_file} has no _class_name; save the model with ModelMixin.save_pretrained")
    model = _classifier_class(class_name).from_pretrained(folder, use_safetensors=True)
    return model.to(device).eval()


def load_classifier_features(
    folder: str | Path, batch_size: int = 256, device: str | torch.device = "cpu"
) -> ClassifierFeatures:
    """Features (and label predictions) from a classifier folder; inputs resized to its ``sample_size``."""
    folder = Path(folder)
    model = load_classifier(folder, device)
    name = f"{type(model).__name__}@{folder.resolve().name}-{_weights_digest(folder)}"
    resize = getattr(model.config, "sample_size", None)
    return ClassifierFeatures(model, name=name, resize=resize, batch_size=batch_size, device=device)


class DigitsClassifierFeatures(ClassifierFeatures):
    """The bundled digits classifier (``assets/digits-classifier``): 128-d pooled features and labels."""

    def __init__(
        self, path: str | Path = DIGITS_CLASSIFIER_PATH, batch_size: int = 256, device: str | torch.device = "cpu"
    ) -> None:
        loaded = load_classifier_features(path, batch_size=batch_size, device=device)
        super().__init__(loaded.module, loaded.name, loaded.resize, batch_size, device)


def find_inception_weights(path: str | Path | None = None) -> Path:
    """Locate ``inception-2015-12-05.pt``: ``path``, else ``$SADM_INCEPTION_PATH``, else the torch hub cache."""
    if path is None:
        path = os.environ.get(INCEPTION_PATH_ENV) or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}; download {INCEPTION_URL} (needs network, ~90 MB) "
            f"to that path, or set {INCEPTION_PATH_ENV} to the file"
        )
    return path


class InceptionFeatures:
    """Inception-v3 pool3 features (2048-d), the network of the FID/KID/PR papers.

    Loads the TorchScript export of the TF FID graph (``inception-2015-12-05.pt``), which takes uint8
    images of any size and resizes them to 299x299 itself, as StyleGAN2-ADA, EDM and clean-fid do.
    """

    name = "inception-v3-pool3@inception-2015-12-05"

    def __init__(
        self, path: str | Path | None = None, batch_size: int = 64, device: str | torch.device = "cpu"
    ) -> None:
        self.batch_size = batch_size
        self.device = torch.device(device)
        weights = find_inception_weights(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the published file is TorchScript
            self.model = torch.jit.load(str(weights), map_location=self.device).eval()

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        features = [
            self.model(batch, return_features=True).float().cpu()
            for batch in _batches(_check_images(images), self.batch_size, self.device)
        ]
        return torch.cat(features).numpy()


def build_feature_extractor(
    spec: str, batch_size: int = 64, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """``"inception"``, ``"digits"``, a classifier folder, or a TorchScript Inception ``.pt`` file."""
    if spec == "inception":
        return InceptionFeatures(batch_size=batch_size, device=device)
    if spec == "digits":
        return DigitsClassifierFeatures(batch_size=batch_size, device=device)
    path = Path(spec)
    if path.is_dir():
        return load_classifier_features(path, batch_size=batch_size, device=device)
    if path.suffix == ".pt":
        return InceptionFeatures(path, batch_size=batch_size, device=device)
    raise ValueError(
        f"unknown feature extractor {spec!r}; use inception, digits, a classifier folder "
        "(save_pretrained) or an inception-2015-12-05.pt file"
    )
