"""Text-embedding cache: every prompt of a run encoded once, kept on disk, reused; then the encoders leave memory.

What is stored: for each prompt, what the family adapter's `encode_text` returns for it (a dict of
tensors: SD `prompt_embeds`; SDXL would add `pooled_prompt_embeds`, PixArt `prompt_attention_mask`),
in the dtype the encoders ran in. The cache is generic; the adapter says which components encode
(`text_encoder_names`, `tokenizer_names`) and what comes out.

Which prompts: every caption of the data set, the empty prompt (caption dropout for classifier-free
guidance, uncaptioned rows) and the validation prompts, so that validation grids during training
sample from cached embeddings (the pipeline gets `prompt_embeds` / `negative_prompt_embeds`). The
encoders come back only for the export (`FamilyAdapter.reload_frozen_fp32`), whose final grid is
sampled from the reloaded pipeline with its own encoders, as a user would.

Key: a folder per fingerprint of the text encoding (the adapter class and its `encode_text_version`,
each encoder's class, config and weights, each tokenizer, the dtype, and the quantization of encoders
loaded quantized by --quantize_text_encoders), and in it a file per prompt, named by the sha256 of the
prompt: `<text_cache_dir>/<fingerprint>/<h[:2]>/<h>.safetensors`, written atomically. Embeddings made by
quantized encoders therefore never serve a full-precision run (nor the other way round), and their files
say so in their metadata ("text_encoders": e.g. "text_encoder_2: Int8WeightOnlyConfig (torchao)").
Prompts are added one by one, so runs on other captions with the same encoders share the folder.
Stale folders are never deleted: remove them by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config.run import DataConfig, TrainingConfig
from .datasets import TrainData, caption_text
from ..utils.errors import ConfigError, InputError
from .latent_cache import hash_tensors
from ..tuners.quantization import is_quantized, quantization_label, quantization_of

CACHE_FORMAT = 1


def _tokenizer_state(tokenizer: Any) -> str:
    """Everything that decides a tokenizer's ids: its class, length and padding, and its full definition (the
    `tokenizers` JSON: vocabulary, merges, normalizer) or, without one, its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    head = {"class": type(tokenizer).__name__, "model_max_length": tokenizer.model_max_length,
            "padding_side": tokenizer.padding_side}
    return json.dumps(head, sort_keys=True) + body


def text_fingerprint(adapter: Any, dtype: torch.dtype) -> str:
    """sha256 of the text encoding: other encoders, weights, tokenizers, dtype, quantization or encode recipe never
    hit. (The quantization is in the key only where an encoder is quantized: full-precision keys are unchanged.)"""
    head = {"format": CACHE_FORMAT, "adapter": type(adapter).__name__,
            "encode_text_version": adapter.encode_text_version, "dtype": str(dtype).removeprefix("torch.")}
    quantized = {name: quantization_of(encoder) for name, encoder in sorted(adapter.text_encoders().items())
                 if is_quantized(encoder)}
    if quantized:
        head["quantization"] = quantized
    h = hashlib.sha256(json.dumps(head).encode())
    for name, encoder in sorted(adapter.text_encoders().items()):
        h.update(f"{name}:{type(encoder).__name__}:{encoder.config.to_json_string()}".encode())
        hash_tensors(h, encoder.state_dict())
    for name, tokenizer in sorted(adapter.tokenizers().items()):
        h.update(f"{name}:{_tokenizer_state(tokenizer)}".encode())
    return h.hexdigest()


class TextEmbeddingCache:
    """The prompt -> {name: tensor} files of one fingerprint folder. `metadata`: written into every file beside the
    prompt (what made the embeddings, where it is worth saying: quantized encoders)."""

    def __init__(self, folder: str | Path, metadata: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.metadata = dict(metadata or {})

    @staticmethod
    def digest(prompt: str) -> str:
        return hashlib.sha256(prompt.encode()).hexdigest()

    def path(self, prompt: str) -> Path:
        digest = self.digest(prompt)
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def __contains__(self, prompt: str) -> bool:
        return self.path(prompt).is_file()

    def write(self, prompt: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={**self.metadata, "prompt": prompt})
        os.replace(tmp, path)

    def load(self, prompt: str) -> dict[str, torch.Tensor]:
        """One prompt's tensors, without a batch dimension (CPU)."""
        try:
            return load_file(str(self.path(prompt)))
        except FileNotFoundError:
            raise InputError(f"text_cache_dir: no cached embedding for the prompt {prompt!r:.60} in {self.folder}; "
                             "remove the folder to rebuild it") from None

    def load_batch(self, prompts: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Prompts -> {name: (B, ...)} on `device`."""
        loaded = [self.load(p) for p in prompts]
        return {name: torch.stack([t[name] for t in loaded]).to(device) for name in loaded[0]}


def prompts_to_cache(adapter: Any, data: TrainData, training: TrainingConfig) -> list[str]:
    """Every prompt the run will ask for, once: the empty prompt, the validation prompts, the captions."""
    prompts = ["", *(adapter.validation_conditions(training) or [])]
    if data.caption_column is not None:
        prompts += [caption_text(c) for c in data.dataset[data.caption_column]]
    return list(dict.fromkeys(prompts))


@torch.no_grad()
def build_text_cache(accelerator: Accelerator, adapter: Any, prompts: Iterable[str], cfg: DataConfig,
                     weight_dtype: torch.dtype, batch_size: int) -> TextEmbeddingCache:
    """Encode the prompts not cached yet (split across processes, on the device in `weight_dtype`), hand the
    cache to the adapter and release its text encoders. Every process returns the same cache."""
    if not adapter.text_encoders():
        raise ConfigError("cache_text_embeddings", f"the {adapter.family} family has no text encoder",
                          "drop --cache_text_embeddings")
    quantized = ", ".join(f"{name}: {quantization_label(encoder)}" for name, encoder in adapter.text_encoders().items()
                          if is_quantized(encoder))  # --quantize_text_encoders: they encode quantized, once
    cache = TextEmbeddingCache(Path(cfg.text_cache_dir).expanduser() / text_fingerprint(adapter, weight_dtype)[:24],
                               {"text_encoders": quantized} if quantized else None)
    prompts = list(prompts)
    todo = [p for p in prompts if p not in cache]
    # A prompt's process is decided by the prompt itself, so ranks that list the folder at different moments
    # (another rank or run already writing) never leave a prompt to nobody.
    mine = [p for p in todo if int(cache.digest(p)[:8], 16) % accelerator.num_processes == accelerator.process_index]
    accelerator.print(f"text cache: {len(prompts) - len(todo)} of {len(prompts)} prompts cached in {cache.folder}"
                      + (f"; encoding {len(todo)}" if todo else "") + (f" (encoders {quantized})" if quantized else ""))
    if mine:
        for encoder in adapter.text_encoders().values():
            encoder.requires_grad_(False)
            if is_quantized(encoder):  # loaded with its unquantized layers in weight_dtype, which it keeps
                encoder.to(accelerator.device).eval()
            else:
                encoder.to(accelerator.device, dtype=weight_dtype).eval()
        for start in tqdm(range(0, len(mine), batch_size), desc="encoding prompts",
                          disable=not accelerator.is_local_main_process):
            batch = mine[start:start + batch_size]
            encoded = {name: value.cpu() for name, value in adapter.encode_text(batch, accelerator.device).items()}
            for i, prompt in enumerate(batch):
                cache.write(prompt, {name: value[i] for name, value in encoded.items()})
    accelerator.wait_for_everyone()
    adapter.use_text_cache(cache, accelerator.device)
    adapter.release_text_encoders()
    return cache


class WithTextEmbeddings(torch.utils.data.Dataset):
    """A dataset whose samples also carry their caption's cached embeddings, as "text_embeddings"."""

    def __init__(self, dataset: torch.utils.data.Dataset, cache: TextEmbeddingCache) -> None:
        self.dataset, self.cache = dataset, cache

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        sample["text_embeddings"] = self.cache.load(caption_text(sample.get("captions")))
        return sample
