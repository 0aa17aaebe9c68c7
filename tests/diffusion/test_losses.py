import torch
from diffusers import DDPMScheduler

from sadm_finetune.diffusion.losses import DiffusionLoss, LearnedSigmaVLB, snr


def test_diffusion_loss_min_snr_weights():
    sched = DDPMScheduler(beta_schedule="linear")
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    t = torch.tensor([1, 999])
    plain = DiffusionLoss("epsilon")(pred, target, snr(t, sched.alphas_cumprod))
    assert plain.tolist() == [1.0, 1.0]
    weighted = DiffusionLoss("epsilon", snr_gamma=5.0)(pred, target, snr(t, sched.alphas_cumprod))
    ratio = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    assert torch.allclose(weighted, torch.clamp(ratio, max=5.0) / ratio)


def test_vlb_trains_only_the_variance_channels():
    sched = DDPMScheduler(beta_schedule="linear")
    vlb = LearnedSigmaVLB(sched.betas)
    x0 = torch.randn(4, 4, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 400, 999])
    noisy = sched.add_noise(x0, noise, t)
    eps = (noise + 0.1 * torch.randn_like(noise)).requires_grad_()
    var = torch.zeros_like(x0).requires_grad_()
    loss = vlb(eps, var, x0, noisy, t)
    assert loss.shape == (4,) and torch.isfinite(loss).all() and (loss >= 0).all()
    loss.sum().backward()
    assert eps.grad is None  # the mean is frozen (DiT's `frozen_out`)
    assert var.grad.abs().sum() > 0
