"""FSDP with SADM: the denoiser sharded by accelerate (FSDP2), the discriminator replicated beside it.

The two-process run goes through tests/fsdp_cpu.py (accelerate maps CPU processes to MULTI_CPU before it
looks at FSDP; the launcher turns that state into FSDP) and must match a DDP run of the same command.
"""

import re
from pathlib import Path
from types import SimpleNamespace

from accelerate.utils import DistributedType
import pytest
import torch
from safetensors.torch import load_file

from launch import ROOT, offline_env, tiny_run_args
from sadm_finetune.config.run import RunConfig
from sadm_finetune.utils.errors import ConfigError
from sadm_finetune.train.entry import _check_distributed_type


def _config(**training) -> RunConfig:
    config = RunConfig()
    for key, value in training.items():
        section = config.model if key == "trainable" else config.training
        setattr(section, key, value)
    return config


def _accelerator(kind: str, mixed_precision: str = "no"):
    return SimpleNamespace(distributed_type=DistributedType[kind], mixed_precision=mixed_precision,
                           print=lambda *a, **k: None)


def test_fsdp_with_sadm_is_accepted_and_its_unwired_options_refused():
    _check_distributed_type(_config(), _accelerator("FSDP", "bf16"))  # SADM on, full fine-tune: runs
    for options, field in (({"trainable": "lora"}, "trainable"), ({"use_ema": True}, "use_ema")):
        with pytest.raises(ConfigError, match=f"^{field}: .*FSDP"):
            _check_distributed_type(_config(**options), _accelerator("FSDP"))
    with pytest.raises(ConfigError, match="^mixed_precision: fp16 with SADM under FSDP"):
        _check_distributed_type(_config(), _accelerator("FSDP", "fp16"))


def test_sadm_under_deepspeed_is_refused_in_one_line_saying_why():
    with pytest.raises(ConfigError) as err:
        _check_distributed_type(_config(), _accelerator("DEEPSPEED"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("structure_weight: SADM is not supported under DeepSpeed")
    assert "accelerator.backward runs and steps that model's engine" in message
    config = _config()
    config.sadm.structure_weight = 0.0
    _check_distributed_type(config, _accelerator("DEEPSPEED"))  # plain fine-tunes are not blocked


def _launch(script: str, flags: list[str], args: list[str], env: dict[str, str]):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_processes", "2", *flags, str(ROOT / script), *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _losses(text: str) -> list[float]:
    found = [float(v) for v in re.findall(r"loss=([0-9.]+)\]", text)]
    return list(dict.fromkeys(found))  # tqdm repeats each postfix


def _weights(out: Path, sub: str) -> dict[str, torch.Tensor]:
    return load_file(next((out / sub).glob("*.safetensors")))


@pytest.fixture(scope="module")
def fsdp_run(ddp_run, tmp_path_factory):
    """One FSDP2 SADM run on 2 CPU processes with configs/accelerate/fsdp.yaml (validation and a checkpoint at
    step 2), shared by the tests below; base, data and flags of conftest.py's DDP run `ddp_run`."""
    tmp = tmp_path_factory.mktemp("fsdp")
    base, data = ddp_run.base, ddp_run.data
    env = offline_env(tmp, OMP_NUM_THREADS="1")
    flags = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")]  # shipped: 8 -> 2, bf16 -> no
    extra = ["--report_to", "none", "--validation_steps", "2", "--checkpointing_steps", "2"]
    proc = _launch("tests/fsdp_cpu.py", flags, tiny_run_args(base, data, tmp / "fsdp") + extra, env)
    return SimpleNamespace(tmp=tmp, base=base, data=data, env=env, out=tmp / "fsdp", proc=proc,
                           text=proc.stdout + proc.stderr)


@pytest.mark.slow
def test_fsdp2_sadm_run_exports_a_stock_pipeline(fsdp_run):
    out, text = fsdp_run.out, fsdp_run.text
    assert fsdp_run.proc.returncode == 0, text[-3000:]
    assert "discriminator bit-identical on all 2 processes; denoiser sharded (FSDP), one copy" in text
    # The denoiser really was sharded: accelerate wrote FSDP's distributed checkpoint, D beside it.
    assert (out / "checkpoints" / "checkpoint-4" / "pytorch_model_fsdp_0").is_dir()
    from diffusers import DiffusionPipeline, DiTPipeline

    pipe = DiffusionPipeline.from_pretrained(out, use_safetensors=True)  # stock loader, full (gathered) weights
    assert isinstance(pipe, DiTPipeline)
    assert (out / "samples" / "step-2.png").is_file() and (out / "samples" / "final.png").is_file()


@pytest.mark.slow
def test_fsdp2_sadm_run_matches_the_ddp_run(fsdp_run, ddp_run):
    assert fsdp_run.proc.returncode == 0, fsdp_run.text[-3000:]
    assert ddp_run.proc.returncode == 0, ddp_run.proc.stderr[-3000:]
    fsdp_losses, ddp_losses = _losses(fsdp_run.text), _losses(ddp_run.text)
    assert len(fsdp_losses) == 4 and fsdp_losses == pytest.approx(ddp_losses, abs=2e-4)
    for sub in ("transformer", "structure_discriminator"):
        a, b = _weights(ddp_run.out, sub), _weights(fsdp_run.out, sub)
        assert a.keys() == b.keys()
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5, sub


@pytest.mark.slow
def test_fsdp2_sadm_run_resumes_exactly_from_its_checkpoint(fsdp_run):
    """Resume at step 2 from the FSDP run's own checkpoint (sharded denoiser, D beside it) and finish at step 4:
    the same weights as the uninterrupted run."""
    import shutil

    assert fsdp_run.proc.returncode == 0, fsdp_run.text[-3000:]
    out = fsdp_run.tmp / "resumed"
    shutil.copytree(fsdp_run.out / "checkpoints" / "checkpoint-2", out / "checkpoints" / "checkpoint-2")
    flags = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")]
    args = tiny_run_args(fsdp_run.base, fsdp_run.data, out) + ["--report_to", "none",
                                                               "--resume_from_checkpoint", "latest"]
    proc = _launch("tests/fsdp_cpu.py", flags, args, fsdp_run.env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Resumed from" in proc.stdout + proc.stderr
    for sub in ("transformer", "structure_discriminator"):
        a, b = _weights(fsdp_run.out, sub), _weights(out, sub)
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6, sub
