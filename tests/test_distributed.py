"""Several processes through accelerate (CPU, gloo) and the global-batch structure loss."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import DDPMScheduler

from launch import accelerate_launch, offline_env, tiny_run_args
from sadm_finetune.config import SADMConfig
from sadm_finetune.models.discriminator import StructureDiscriminator
from sadm_finetune.sadm import SADMObjective
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
    return SADMObjective(SADMConfig(), DDPMScheduler(beta_schedule="linear").alphas_cumprod)


def _rank_main(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    disc, latents, x0_hat, t = _inputs()
    part = slice(rank * 4, rank * 4 + 4)
    x_local = x0_hat[part].clone().requires_grad_()
    loss, logs = _objective().generator_loss(disc, latents[part], x_local, t[part], None)
    loss.backward()
    queue.put((rank, logs["structure_loss_g"].item(), loss.item(), x_local.grad.numpy().copy()))
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_structure_loss_equals_the_one_process_value():
    disc, latents, x0_hat, t = _inputs()
    x_full = x0_hat.clone().requires_grad_()
    loss, _ = _objective().generator_loss(disc, latents, x_full, t, None)
    loss.backward()

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_rank_main, args=(2, _free_port(), queue), nprocs=2, join=True, start_method="spawn")
    results = sorted(queue.get(timeout=60) for _ in range(2))
    for rank, value, scaled, grad in results:
        assert value == pytest.approx(loss.item(), rel=1e-5)  # the relation matrix covers the global batch
        assert scaled == pytest.approx(2 * loss.item(), rel=1e-5)  # undoes DDP's average over 2 ranks
        # Each rank's gradient reaches only its own samples; after DDP's 1/2 average it is the true one.
        assert torch.allclose(torch.from_numpy(grad) / 2, x_full.grad[rank * 4:rank * 4 + 4], atol=1e-6)


@pytest.mark.slow
def test_two_cpu_processes_train_in_lockstep(tmp_path):
    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "out"
    args = tiny_run_args(base, data, out, steps=4) + ["--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
                                                      "--validation_steps", "2", "--report_to", "none"]
    proc = accelerate_launch(args, offline_env(tmp_path), num_processes=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = proc.stdout + proc.stderr
    assert "2 processes" in text
    assert "replica check: denoiser, discriminator identical on all 2 processes" in text
    assert (out / "model_index.json").is_file() and (out / "samples" / "step-2.png").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4"]
    # One random-state file per rank: each process saved its part of the checkpoint.
    assert len(list((out / "checkpoints" / "checkpoint-4").glob("random_states_*.pkl"))) == 2
