"""Feature extractors: the wrapper's conventions, the bundled digits classifier, Inception loading."""

import numpy as np
import pytest
import torch

from sadm_finetune.data.digits import load_digits_images
from sadm_finetune.evaluation.features import (
    DigitsClassifierFeatures,
    InceptionFeatures,
    ModuleFeatures,
    build_feature_extractor,
    load_classifier_features,
)
from sadm_finetune.evaluation.digits_classifier import DigitsClassifier


class _MeanColour(torch.nn.Module):
    def forward(self, pixel_values):
        return pixel_values.mean(dim=(2, 3))  # (B, 3)


def test_module_features_scale_to_minus_one_one_and_batch():
    images = np.zeros((5, 8, 8, 3), dtype=np.uint8)
    images[1:] = 255
    feats = ModuleFeatures(_MeanColour(), name="mean", batch_size=2)(images)
    assert feats.shape == (5, 3) and feats.dtype == np.float32
    np.testing.assert_allclose(feats[0], -1.0)
    np.testing.assert_allclose(feats[1:], 1.0)


def test_module_features_resize_to_the_module_size():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, pixel_values):
            seen.append(tuple(pixel_values.shape))
            return pixel_values.flatten(1)

    feats = ModuleFeatures(Probe(), name="probe", resize=4)(np.zeros((2, 16, 16, 3), dtype=np.uint8))
    assert seen == [(2, 3, 4, 4)] and feats.shape == (2, 48)


def test_module_features_reject_float_images():
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        ModuleFeatures(_MeanColour(), name="mean")(np.zeros((2, 8, 8, 3), dtype=np.float32))


def test_bundled_digits_classifier_recognises_digits():
    images, labels = load_digits_images(32)
    extractor = DigitsClassifierFeatures()
    picked = np.arange(0, len(images), 7)  # every 7th digit: a quick, spread-out sample
    assert (extractor.predict(images[picked]) == labels[picked]).mean() > 0.95
    feats = extractor(images[picked[:10]])
    assert feats.shape == (10, extractor.module.config.block_out_channels[-1])
    assert extractor.name.startswith("DigitsClassifier@digits-classifier-")


def test_classifier_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DigitsClassifier(block_out_channels=(4, 8), num_classes=3).eval()
    model.save_pretrained(tmp_path / "clf")
    assert (tmp_path / "clf" / "diffusion_pytorch_model.safetensors").is_file()
    extractor = load_classifier_features(tmp_path / "clf", batch_size=3)
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    np.testing.assert_allclose(extractor(images), expected.features.numpy(), rtol=1e-5, atol=1e-6)
    # Batched differently (batch_size 3 vs 4): logits agree to rounding, so the argmax is compared where the
    # top two logits are not within rounding of each other.
    top2 = expected.logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1] > 1e-4).numpy()
    assert clear.any()
    np.testing.assert_array_equal(extractor.predict(images)[clear], expected.logits.argmax(1).numpy()[clear])


def test_classifier_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json; pass a folder written by save_pretrained"):
        load_classifier_features(tmp_path)


def test_inception_without_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("SADM_INCEPTION_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match=r"download https://nvlabs-fi-cdn.*inception-2015-12-05.pt"):
        InceptionFeatures()


class _FakeInception(torch.nn.Module):
    """Stands in for the TorchScript Inception: same call signature, uint8 NCHW in."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert img.dtype == torch.uint8
        features = img.float().mean(dim=(2, 3)).repeat(1, 4)  # (B, 12)
        return features if return_features else features[:, :1]


def test_inception_loads_a_torchscript_file(tmp_path, monkeypatch):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    monkeypatch.setenv("SADM_INCEPTION_PATH", str(path))
    images = np.full((3, 10, 10, 3), 7, dtype=np.uint8)
    for extractor in (InceptionFeatures(batch_size=2), build_feature_extractor(str(path))):
        feats = extractor(images)
        assert feats.shape == (3, 12)
        np.testing.assert_allclose(feats, 7.0)


def test_unknown_feature_spec_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown feature extractor 'clip'; use inception, digits"):
        build_feature_extractor("clip")
