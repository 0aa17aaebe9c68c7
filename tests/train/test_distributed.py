"""Several processes through accelerate (CPU, gloo) and the global-batch structure loss."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import DDPMScheduler

from launch import ROOT, offline_env, tiny_run_args
from sadm_finetune.terms.sadm.config import SADMConfig
from sadm_finetune.terms.sadm.discriminator import StructureDiscriminator
from sadm_finetune.terms.sadm.objective import SADMObjective
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    torch.manual_seed(0)
    disc = StructureDiscriminator(in_channels=4, base_channels=8, num_blocks=2, embed_dim=16, spectral_norm=False)
    latents = torch.randn(8, 4, 8, 8)
    x0_hat = torch.randn(8, 4, 8, 8)
    t = torch.randint(0, 1000, (8,))
    return disc, latents, x0_hat, t


def _objective():
    from sadm_finetune.diffusion.process import DDPMProcess

    return SADMObjective(SADMConfig(), DDPMProcess(DDPMScheduler(beta_schedule="linear").config, "cpu"))


def _rank_main(rank, world, port, queue):
    """One rank of the 2-process group that both tests below read: the structure loss of its half of the
    global batch, then the replica comparison."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    disc, latents, x0_hat, t = _inputs()
    part = slice(rank * 4, rank * 4 + 4)
    x_local = x0_hat[part].clone().requires_grad_()
    loss, logs = _objective().generator_loss(disc, latents[part], x_local, t[part], None)
    loss.backward()
    queue.put(("structure_loss", rank, (logs["structure_loss_g"].item(), loss.item(), x_local.grad.numpy().copy())))
    dist.barrier()
    queue.put(("replicas", rank, _replica_differences(rank)))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    """Results of `_rank_main` on 2 spawned processes: {"structure_loss": {rank: ...}, "replicas": {rank: ...}}."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_rank_main, args=(2, _free_port(), queue), nprocs=2, join=True, start_method="spawn")
    results = {"structure_loss": {}, "replicas": {}}
    for _ in range(4):
        kind, rank, value = queue.get(timeout=60)
        results[kind][rank] = value
    return results


def test_two_process_structure_loss_equals_the_one_process_value(two_ranks):
    disc, latents, x0_hat, t = _inputs()
    x_full = x0_hat.clone().requires_grad_()
    loss, _ = _objective().generator_loss(disc, latents, x_full, t, None)
    loss.backward()

    assert sorted(two_ranks["structure_loss"]) == [0, 1]
    for rank, (value, scaled, grad) in two_ranks["structure_loss"].items():
        assert value == pytest.approx(loss.item(), rel=1e-5)  # the relation matrix covers the global batch
        assert scaled == pytest.approx(2 * loss.item(), rel=1e-5)  # undoes DDP's average over 2 ranks
        # Each rank's gradient reaches only its own samples; after DDP's 1/2 average it is the true one.
        assert torch.allclose(torch.from_numpy(grad) / 2, x_full.grad[rank * 4:rank * 4 + 4], atol=1e-6)


def _replica_differences(rank):
    """Inside `_rank_main`'s process group: rank 1 holds a swapped and a one-ulp-nudged copy."""
    from sadm_finetune.train.distributed import replica_differences

    torch.manual_seed(0)
    same, swapped, nudged = (torch.nn.Linear(4, 3) for _ in range(3))
    if rank == 1:
        with torch.no_grad():
            w = swapped.weight.view(-1)
            w[0], w[1] = w[1].clone(), w[0].clone()  # same sum and sum of squares: a float fingerprint misses it
            nudged.bias[2] = torch.nextafter(nudged.bias[2], torch.tensor(10.0))  # one ulp
    return replica_differences({"same": same, "swapped": swapped, "nudged": nudged})


def test_replica_comparison_is_exact(two_ranks):
    results = two_ranks["replicas"]
    assert sorted(results) == [0, 1]
    assert results[0] == results[1]  # every rank gets the same verdict
    diffs = results[0]
    assert diffs["same"] == (0, 0.0)
    assert diffs["swapped"][0] == 2 and diffs["swapped"][1] > 0
    assert diffs["nudged"][0] == 1 and 0 < diffs["nudged"][1] < 1e-6


@pytest.mark.slow
def test_two_cpu_processes_train_in_lockstep(ddp_run):
    out, text = ddp_run.out, ddp_run.text  # conftest.py: accelerate launch --multi_gpu --num_processes 2
    assert ddp_run.proc.returncode == 0, ddp_run.proc.stderr[-4000:]
    assert "2 processes" in text
    assert "replica check: denoiser, discriminator bit-identical on all 2 processes" in text
    assert (out / "model_index.json").is_file() and (out / "samples" / "step-2.png").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4"]
    # One random-state file per rank: each process saved its part of the checkpoint.
    assert len(list((out / "checkpoints" / "checkpoint-4").glob("random_states_*.pkl"))) == 2


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    for pid in _descendants(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 only: the stop is agreed across ranks, one checkpoint, both exit 0."""
    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=100000) + ["--validation_steps", "1", "--report_to", "none"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--num_processes", "2", "--multi_gpu", str(ROOT / "train_sadm.py"), *args]
    proc = subprocess.Popen(launcher, env=offline_env(tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (out / "samples" / "step-1.png").exists() and proc.poll() is None:
            time.sleep(0.2)
        assert (out / "samples" / "step-1.png").exists(), "training never reached step 1"
        rank1 = _rank_pid(proc.pid, 1)
        assert rank1 is not None
        os.kill(rank1, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:  # a hang (ranks in different collectives): kill the whole launch
            for pid in _descendants(proc.pid):  # the ranks run in sessions of their own
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, stderr[-4000:]
    text = stdout + stderr
    stopped = re.findall(r"Stopped by signal at step (\d+); checkpoint saved", text)
    assert len(stopped) == 1, text[-3000:]
    step = int(stopped[0])
    ckpt = out / "checkpoints" / f"checkpoint-{step}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [ckpt.name]
    assert json.loads((ckpt / "train_state.json").read_text())["global_step"] == step
    assert len(list(ckpt.glob("random_states_*.pkl"))) == 2  # both ranks wrote their part at that step
    assert not (out / "model_index.json").exists()
