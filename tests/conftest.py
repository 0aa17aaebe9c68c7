"""Shared pytest fixtures. The whole suite is offline: no test reaches the network."""

import os
import tempfile

# Set before any test module imports huggingface_hub / diffusers / datasets (they read these once).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="sadm-tests-hf-home-"))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# One intra-op thread, in this process (torch reads it on import) and in every subprocess a test starts (they
# inherit it): the tiny models gain nothing from a second thread, and beside other work on a 2-core machine
# OpenMP's spinning threads made each training step several times slower (1.7 vs 10 steps/s, measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# ---------------------------------------------------------------------------------------------
# fake_hub: a fake Hugging Face Hub on 127.0.0.1 (tests/hub_server.py) for --push_to_hub tests.
# ---------------------------------------------------------------------------------------------
import os as _fh_os
import sys as _fh_sys
from pathlib import Path as _FhPath

import pytest as _fh_pytest

if str(_FhPath(__file__).resolve().parent) not in _fh_sys.path:
    _fh_sys.path.insert(0, str(_FhPath(__file__).resolve().parent))

FAKE_HF_TOKEN = "hf_fake_token_for_tests_1234567890"


@_fh_pytest.fixture
def fake_hub(monkeypatch, tmp_path_factory):
    """Start a ``hub_server.FakeHub`` (requires ``Authorization: Bearer FAKE_HF_TOKEN``) and yield it.

    For the duration of the test:

    * env: ``HF_ENDPOINT=<fake_hub.endpoint>``, ``HF_TOKEN=FAKE_HF_TOKEN``, ``HF_HUB_OFFLINE=0``
      (``0`` rather than unset, so an inherited ``TRANSFORMERS_OFFLINE=1`` cannot re-enable offline
      mode), ``NO_PROXY`` += 127.0.0.1; ``HF_HOME`` -> a temp dir only if it was unset (hf_xet
      writes logs there during ``upload_folder``; huggingface_hub caches its agent registry).
      A subprocess started with the default or a copied ``os.environ`` therefore talks to the
      fake hub (``fake_hub.env()`` gives just the variables to merge into a hand-built env).
    * in-process: huggingface_hub reads ``HF_ENDPOINT``/``HF_HUB_OFFLINE`` once at import, so the
      fixture also patches ``huggingface_hub.constants.ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``,
      ``HF_HUB_OFFLINE=False`` (what ``is_offline_mode()`` returns; every HTTP call is refused
      while it is True) and the module-level ``huggingface_hub.hf_api.api.endpoint`` (used by
      ``huggingface_hub.upload_folder``/``create_repo``, as diffusers' ``push_to_hub`` calls them).
      So ``HfApi()``, ``HfApi(endpoint=fake_hub.endpoint)`` and the module functions all work,
      even with ``HF_HUB_OFFLINE=1`` set for the rest of the suite. The token comes from
      ``HF_TOKEN``, which huggingface_hub re-reads on every call. Everything is restored after.
    """
    from hub_server import FakeHub

    with FakeHub(token=FAKE_HF_TOKEN) as hub:
        for key, value in hub.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", raising=False)
        own_hf_home = None
        if not _fh_os.environ.get("HF_HOME"):
            own_hf_home = tmp_path_factory.mktemp("fake_hub_hf_home")
            monkeypatch.setenv("HF_HOME", str(own_hf_home))
        try:
            import huggingface_hub.constants as hf_constants
            import huggingface_hub.hf_api as hf_api
        except ImportError:  # huggingface_hub missing: env-only (subprocess) use still works
            yield hub
            return
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(
            hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
        if own_hf_home is not None and hasattr(hf_constants, "AGENT_HARNESSES_PATH"):
            # online => huggingface_hub caches GET /api/agent-harnesses under its import-time HF_HOME
            monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(own_hf_home / ".agent_harnesses.json"))
        yield hub


# ---------------------------------------------------------------------------------------------
# demo_run: the README's main command, run once for the tests that read its files or its output.
# ---------------------------------------------------------------------------------------------
@_fh_pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`accelerate launch train_sadm.py --config configs/demo.yaml`, shortened to 3 steps and a 1-image final grid:
    the bundled base on builtin digits, offline. test_demo_recipe checks what it exports, test_quiet what it
    prints. Returns (output folder, CompletedProcess)."""
    from launch import ROOT, accelerate_launch, offline_env

    tmp = tmp_path_factory.mktemp("demo_run")
    out = tmp / "demo"
    args = ["--config", "configs/demo.yaml", "--output_dir", str(out), "--max_train_steps", "3",
            "--structure_warmup_steps", "0", "--validation_inference_steps", "2", "--num_validation_images", "1",
            "--report_to", "none"]
    assert (ROOT / "configs" / "demo.yaml").is_file()
    return out, accelerate_launch(args, offline_env(tmp))


# ---------------------------------------------------------------------------------------------
# ddp_run: one SADM run on 2 CPU processes (DDP over gloo), for test_distributed and test_fsdp.
# ---------------------------------------------------------------------------------------------
@_fh_pytest.fixture(scope="session")
def ddp_run(tmp_path_factory):
    """`accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): 4 SADM steps, validation and a checkpoint
    every 2 steps, 1 checkpoint kept. test_distributed checks the lockstep; test_fsdp runs FSDP on the same base
    and data and compares (validation and checkpoints do not change the training: the FSDP run has them too)."""
    from types import SimpleNamespace

    from launch import accelerate_launch, offline_env, tiny_run_args
    from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

    tmp = tmp_path_factory.mktemp("ddp_run")
    base = build_tiny_dit_pipeline(tmp / "base", num_classes=2)
    data = build_image_folder(tmp / "data", per_class=6)
    out = tmp / "out"
    # no EMA: test_fsdp compares this run's export with the FSDP run's, which has none
    args = tiny_run_args(base, data, out, steps=4) + ["--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
                                                      "--validation_steps", "2", "--report_to", "none", "--no_use_ema"]
    proc = accelerate_launch(args, offline_env(tmp), num_processes=2)
    return SimpleNamespace(base=base, data=data, out=out, proc=proc, text=proc.stdout + proc.stderr)


# ---------------------------------------------------------------------------------------------
# repa_sddit_ddp_run: SADM, REPA and SD-DiT on together on 2 CPU processes, for test_repa and test_sddit.
# ---------------------------------------------------------------------------------------------
@_fh_pytest.fixture(scope="session")
def repa_sddit_ddp_run(tmp_path_factory):
    """`accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): 3 steps with REPA (its projector trained with
    the denoiser) and the lazy SD-DiT (on updates 0 and 2 only: its head idle on update 1; masked student pass, EMA
    teacher, centre all-reduced) beside SADM's discriminator.
    Each test asserts its own modules in the replica check's line. `identical`: the modules that line names bit-
    identical on all 2 processes ([] when there is no such line)."""
    import re
    from types import SimpleNamespace

    from launch import accelerate_launch, offline_env, tiny_run_args
    from tiny_encoders import build_tiny_encoder, repa_args
    from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

    tmp = tmp_path_factory.mktemp("repa_sddit_ddp_run")
    base = build_tiny_dit_pipeline(tmp / "base", num_classes=2, num_layers=2)
    data = build_image_folder(tmp / "data", per_class=4)
    encoder = build_tiny_encoder(tmp / "enc")
    sddit = ["--sddit_weight", "0.1", "--sddit_encoder_depth", "1", "--sddit_head_dim", "32",
             "--sddit_head_hidden_dim", "32", "--sddit_mask_ratio", "0.5", "--sddit_every", "2"]
    args = tiny_run_args(base, data, tmp / "out", steps=3) + repa_args(encoder) + sddit + [
        "--report_to", "none", "--train_batch_size", "2"]
    proc = accelerate_launch(args, offline_env(tmp), num_processes=2)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    lines = re.findall(r"^replica check: (.+) bit-identical on all 2 processes$", text, flags=re.M)
    return SimpleNamespace(proc=proc, text=text, identical=lines[0].split(", ") if len(lines) == 1 else [])


# ---------------------------------------------------------------------------------------------
# stock_diffusers: loads exports in a process that never imports sadm_finetune (tests/stock_diffusers.py).
# ---------------------------------------------------------------------------------------------
@_fh_pytest.fixture(scope="session")
def stock_diffusers(tmp_path_factory):
    """One stock-diffusers process for the session (its imports are paid once):
    `.load(path, class_labels=None, prompts=None, lora=None)`."""
    from launch import offline_env
    from stock_diffusers import StockDiffusers

    worker = StockDiffusers(offline_env(tmp_path_factory.mktemp("stock_diffusers")))
    yield worker
    worker.close()
