"""benchmarks/gpu_check.py (not CI's own check, which needs a GPU): it refuses cleanly without CUDA, and its
step runs, on CPU and a tiny DiT, with finite losses (so the GPU day is not spent on a typo)."""

import subprocess
import sys

import pytest
import torch

from launch import ROOT

sys.path.insert(0, str(ROOT))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU: the check would run")
def test_gpu_check_without_cuda_exits_with_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=120, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert proc.stdout == "" and proc.stderr.startswith("gpu_check: no CUDA GPU visible")
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize("sadm", [False, True])
def test_gpu_check_arm_runs_on_cpu_with_a_tiny_dit(sadm):
    from benchmarks.gpu_check import _arm

    tiny = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    row = _arm(sadm, "sdpa", batch=4, steps=3, device="cpu", dit_config=tiny)
    assert row["all_losses_finite"]
    assert ("structure_loss_g" in row["last_losses"]) == sadm and ("loss_d" in row["last_losses"]) == sadm


def test_gpu_check_cli_cases_cover_every_family_precision_and_trainable():
    from benchmarks.gpu_check import CLI_FAMILIES, cli_cases
    from sadm_finetune.families.loading import FAMILIES

    cases = cli_cases()
    assert len(cases) == len({c["name"] for c in cases}) == 28
    assert {(c["family"], c["precision"], c["trainable"]) for c in cases} == {
        (f, p, t) for f in ("dit", "sd", "sdxl", "sd3", "pixart", "flux", "qwen") for p in ("bf16", "fp16")
        for t in ("lora", "full")}
    assert len(CLI_FAMILIES) == len(FAMILIES)  # a new family needs its tiny pipeline in the check


def test_gpu_check_cli_case_runs_on_cpu_in_fp32(tmp_path):
    """One case through the same runner, CPU and fp32: the sadm-train CLI in process, the result row it reports."""
    from benchmarks.gpu_check import _all_finite, run_cli_case

    row = run_cli_case({"name": "dit/full/no", "family": "dit", "trainable": "full", "precision": "no"}, tmp_path,
                       steps=1)
    assert row["ok"], row
    assert row["seconds"] > 0 and row["peak_memory_gb"] is None  # no CUDA: no memory figure
    out = tmp_path / "runs" / "dit-full-no"
    assert (out / "samples" / "final.png").is_file() and _all_finite(out)
    if not torch.cuda.is_available():  # accelerate's fp16 on a CPU has no autocast: refused in one line, reported
        bad = run_cli_case({"name": "dit/lora/fp16", "family": "dit", "trainable": "lora", "precision": "fp16"},
                           tmp_path)
        assert not bad["ok"] and bad["error"].startswith(
            "exit status 2: sadm-train: error: mixed_precision: fp16 on cpu runs without autocast"), bad
