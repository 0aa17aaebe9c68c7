"""sadm-eval's structure probe (terms/sadm/probe.py): by noise level, the fixed-encoder structure gap and how
well the run's discriminator tells z0 from x0_hat."""

import shutil

import numpy as np
import pytest
import torch
import yaml
from diffusers import DiTPipeline

from sadm_finetune.data.digits import load_digits_images
from sadm_finetune.evaluation.evaluate import format_table
from sadm_finetune.terms.sadm.discriminator import StructureDiscriminator
from sadm_finetune.terms.sadm.probe import load_discriminator, native_resolution, probe

DEMO = "sadm_finetune/assets/demo-dit-digits"


@pytest.fixture(scope="module")
def pipe():
    return DiTPipeline.from_pretrained(DEMO, use_safetensors=True)


def _images(pipe, n=16):
    images, labels = load_digits_images(native_resolution(pipe))
    return images[:n], [int(c) for c in labels[:n]]


def test_probe_without_a_discriminator_reports_the_fixed_gap_growing_with_noise(pipe):
    images, labels = _images(pipe)
    result = probe(pipe, images, labels, None, timesteps=(0, 900), seed=0, batch_size=8)
    assert result["timesteps"] == [0, 900] and result["d_pair_cos"] is None
    near_clean, noisy = result["structure_gap_fixed"]
    # At t=0, x0_hat is z0 up to sqrt(1 - ab_0) = 1% of the noise; at t=900 it is a posterior mean.
    assert 0 <= near_clean < 1e-3 < noisy
    again = probe(pipe, images, labels, None, timesteps=(0, 900), seed=0, batch_size=16)  # other batching
    assert np.allclose(again["structure_gap_fixed"], result["structure_gap_fixed"], rtol=1e-4, atol=1e-7)


def test_discriminator_and_its_training_options_are_read_from_the_run_folder(tmp_path, pipe):
    run = tmp_path / "run"
    shutil.copytree(DEMO, run)
    torch.manual_seed(0)
    StructureDiscriminator(in_channels=4, base_channels=8, num_blocks=2, embed_dim=16).save_pretrained(
        run / "structure_discriminator")
    (run / "training_config.yaml").write_text(yaml.safe_dump({"sadm": {"disc_pool": 2, "a_future_key": 1}}))
    disc, options = load_discriminator(str(run), "cpu")
    assert isinstance(disc, StructureDiscriminator) and options.disc_pool == 2
    assert load_discriminator(DEMO, "cpu") == (None, None)

    images, labels = _images(pipe)
    result = probe(pipe, images, labels, None, timesteps=(0, 900), disc=disc, sadm_options=options, batch_size=8)
    near_clean, noisy = result["d_pair_cos"]
    assert near_clean > 0.999 and -1 <= noisy <= 1 and noisy < near_clean  # D maps z0 and a near-copy alike


def test_the_eval_table_labels_the_probe_rows():
    metrics = {"fid": 1.0, "kid_mean": 0.0, "kid_std": 0.0, "precision": 1.0, "recall": 1.0, "structure_gap": 0.1}
    probe = {"timesteps": [100, 900], "structure_gap_fixed": [0.001, 0.1], "d_pair_cos": [0.99, 0.5]}
    result = {"metrics": metrics, "probe": probe, "num_samples": 10, "samples_per_class": 1, "num_classes": 10,
              "num_inference_steps": 5, "guidance_scale": 1.0, "seed": 0, "reference_name": "digits",
              "num_reference_images": 10, "features": "digits",
              "compare_with": {"metrics": metrics, "probe": {**probe, "d_pair_cos": None}}}
    table = format_table(result)
    assert "| structure gap, fixed encoder, t=900 | 0.1 | 0.1 |" in table
    assert "| D pair cosine (1: D cannot tell), t=100 | 0.990 | no D |" in table
