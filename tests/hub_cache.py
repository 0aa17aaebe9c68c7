"""Test helpers shared by several test files (moved from tests/families/test_hub_cache.py so that each file runs alone)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def cache_model(cache: Path, repo_id: str, folder: Path, commit: str, refs: list[str]) -> Path:
    """Put a saved pipeline into the cache as snapshot `commit` (files directly in the snapshot, no blobs)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline, that huggingface_hub (and so diffusers) reads for this test."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache
