"""Text-embedding cache: keyed by encoders and prompt, encoders released, dropout and validation grids still work."""

import gc
import weakref

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from sadm_finetune.config.run import ModelConfig, build_config
from sadm_finetune.data.datasets import open_train_data
from sadm_finetune.utils.errors import ConfigError, InputError
from sadm_finetune.data.loader import build_train_dataloader
from sadm_finetune.families.dit import DiTAdapter
from sadm_finetune.families.loading import load_family
from sadm_finetune.data.text_cache import build_text_cache, prompts_to_cache
from tiny_sd import CAPTIONS, build_captioned_folder, build_tiny_sd_pipeline

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "base")


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _adapter(tiny_sd, p=0.0):
    return load_family(ModelConfig(pretrained_model_name_or_path=str(tiny_sd), caption_dropout_prob=p))


def _config(tiny_sd, tmp_path, data_dir="unused", **fields):
    return build_config({"pretrained_model_name_or_path": str(tiny_sd), "train_data_dir": str(data_dir),
                         "cache_text_embeddings": True, "text_cache_dir": str(tmp_path / "text"), **fields})


@pytest.fixture
def count_encodes(monkeypatch):
    """Prompts each adapter's encode_text was asked for."""
    from sadm_finetune.families.sd import StableDiffusionAdapter

    calls = []
    real = StableDiffusionAdapter.encode_text
    monkeypatch.setattr(StableDiffusionAdapter, "encode_text",
                        lambda self, prompts, device: (calls.extend(prompts), real(self, prompts, device))[1])
    return calls


def _build(accelerator, adapter, config, prompts, dtype=torch.float32):
    return build_text_cache(accelerator, adapter, prompts, config.data, dtype, batch_size=3)


def test_cache_is_keyed_by_the_encoders_and_the_prompt(tmp_path, tiny_sd, accelerator, count_encodes):
    config = _config(tiny_sd, tmp_path)
    prompts = ["", *CAPTIONS]
    first = _build(accelerator, _adapter(tiny_sd), config, prompts)
    assert sorted(count_encodes) == sorted(prompts) and len(list(first.folder.glob("*/*.safetensors"))) == 5
    # The same encoders: every prompt hits; one new prompt is the only one encoded.
    again = _build(accelerator, _adapter(tiny_sd), config, prompts + ["a new prompt"])
    assert again.folder == first.folder and count_encodes[len(prompts):] == ["a new prompt"]
    # Other weights, or another dtype: another folder, everything encoded again.
    nudged = _adapter(tiny_sd)
    with torch.no_grad():
        nudged.text_encoder.get_input_embeddings().weight[5, 0] += 1e-3
    assert _build(accelerator, nudged, config, prompts).folder != first.folder
    assert _build(accelerator, _adapter(tiny_sd), config, prompts, torch.bfloat16).folder != first.folder
    assert len(count_encodes) == 3 * len(prompts) + 1
    stored = load_file(str(first.path(CAPTIONS[0])))
    expected = _adapter(tiny_sd).encode_text([CAPTIONS[0]], CPU)["prompt_embeds"][0]
    assert stored.keys() == {"prompt_embeds"} and torch.equal(stored["prompt_embeds"], expected)


def test_text_encoders_leave_memory_and_come_back_for_the_export(tmp_path, tiny_sd, accelerator):
    adapter = _adapter(tiny_sd)
    encoder = weakref.ref(adapter.text_encoder)
    _build(accelerator, adapter, _config(tiny_sd, tmp_path), ["", CAPTIONS[0]])
    gc.collect()
    assert encoder() is None and adapter.text_encoder is None and adapter.frozen_modules() == [adapter.vae]
    assert adapter.released_text_encoders and adapter.tokenizer is not None  # tokenizing is cheap and stays
    adapter.reload_frozen_fp32()
    assert not adapter.released_text_encoders
    reloaded, base = adapter.text_encoder.state_dict(), load_file(str(tiny_sd / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(reloaded[k], base[k]) for k in base)


def test_cached_conditioning_is_the_encoded_one_with_caption_dropout(tmp_path, tiny_sd, accelerator):
    data_dir = build_captioned_folder(tmp_path / "data", num_images=64)
    config = _config(tiny_sd, tmp_path, data_dir, train_batch_size=64, caption_dropout_prob=0.5)
    data = open_train_data(config.data)
    cached = _adapter(tiny_sd, p=0.5)
    cached.check_data(data)
    cache = _build(accelerator, cached, config, prompts_to_cache(cached, data, config.training))
    dataset, loader = build_train_dataloader(config, accelerator, cached, data, 32, cache)
    batch = next(iter(loader))
    assert batch["text_embeddings"]["prompt_embeds"].shape == (64, 16, 32)
    encoding = _adapter(tiny_sd, p=0.5)
    uncached_batch = {k: v for k, v in batch.items() if k != "text_embeddings"}
    empty = encoding.encode_text([""], CPU)["prompt_embeds"][0]
    for drop in (False, True):
        a = cached.conditioning(batch, CPU, torch.float32, drop, torch.Generator().manual_seed(1))
        b = encoding.conditioning(uncached_batch, CPU, torch.float32, drop, torch.Generator().manual_seed(1))
        # encoded in batches of other sizes: equal up to float rounding
        torch.testing.assert_close(a["encoder_hidden_states"], b["encoder_hidden_states"], rtol=1e-5, atol=1e-5)
        num_empty = sum(torch.allclose(s, empty, atol=1e-5) for s in a["encoder_hidden_states"])
        assert (10 < num_empty < 54) if drop else num_empty == 0  # p = 0.5, from the cached empty prompt


def test_validation_grids_sample_from_cached_prompt_embeddings(tmp_path, tiny_sd, accelerator):
    prompts = ["a red square", "a prompt of no caption"]
    config = _config(tiny_sd, tmp_path, validation_prompts=prompts)
    with_encoder, cached = _adapter(tiny_sd), _adapter(tiny_sd)
    _build(accelerator, cached, config, ["", *prompts])
    assert cached.text_encoder is None

    def grid(adapter, conditions):
        pipeline = adapter.export_pipeline(adapter.denoiser)
        pipeline.set_progress_bar_config(disable=True)
        return adapter.sample_grid(pipeline, 2, 2, 3.0, 0, conditions)

    expected = grid(with_encoder, prompts)
    assert expected.shape == (2, 2, 32, 32, 3)
    torch.testing.assert_close(torch.from_numpy(grid(cached, prompts)), torch.from_numpy(expected), rtol=0, atol=1e-4)
    with pytest.raises(InputError, match="text_cache_dir: no cached embedding for the prompt 'never cached'"):
        grid(cached, ["never cached"])


def test_a_family_without_text_encoders_is_refused_before_loading(tmp_path):
    config = build_config({"pretrained_model_name_or_path": "x", "train_data_dir": "d", "cache_text_embeddings": True})
    with pytest.raises(ConfigError, match="cache_text_embeddings: DiT is class-conditional and has no text encoder"):
        DiTAdapter.check_config(config)
