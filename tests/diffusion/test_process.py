import pytest
import torch
from diffusers import DDPMScheduler

from sadm_finetune.diffusion.losses import diffusion_target, predicted_original_sample, snr


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_hat_matches_scheduler(prediction_type):
    sched = DDPMScheduler(beta_schedule="linear", prediction_type=prediction_type, clip_sample=False)
    torch.manual_seed(0)
    sample = torch.randn(1, 4, 8, 8)
    model_output = torch.randn(1, 4, 8, 8)
    for t in (0, 10, 500, 999):
        expected = sched.step(model_output, t, sample).pred_original_sample
        got = predicted_original_sample(model_output, sample, torch.tensor([t]), sched.alphas_cumprod, prediction_type)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (prediction_type, t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_hat_of_the_true_target_is_the_clean_latent(prediction_type):
    sched = DDPMScheduler(beta_schedule="linear", prediction_type=prediction_type)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 300, 900])
    noisy = sched.add_noise(x0, noise, t)
    target = diffusion_target(x0, noise, t, sched.alphas_cumprod, prediction_type)
    x0_hat = predicted_original_sample(target, noisy, t, sched.alphas_cumprod, prediction_type)
    assert torch.allclose(x0_hat, x0, atol=1e-3)


@pytest.mark.parametrize("name", ["EDMDPMSolverMultistepScheduler", "FlowMatchHeunDiscreteScheduler"])
def test_an_unsupported_noise_process_is_refused_in_one_line(name):
    from sadm_finetune.utils.errors import ConfigError
    from sadm_finetune.diffusion.process import make_process

    config = {**DDPMScheduler().config, "_class_name": name}
    with pytest.raises(ConfigError, match=f"pretrained_model_name_or_path: .*{name}.*EDM, or flow matching") as e:
        make_process(config, "cpu")
    assert "\n" not in str(e.value)


def test_the_ddpm_process_reads_the_pipelines_own_schedule():
    from sadm_finetune.diffusion.process import DDPMProcess

    process = DDPMProcess(DDPMScheduler(beta_schedule="linear", prediction_type="v_prediction").config, "cpu")
    t = torch.tensor([0, 500, 999])
    assert process.prediction_type == "v_prediction"
    assert torch.allclose(process.snr(t), snr(t, process.alphas_cumprod), rtol=1e-5)
    z0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    x_t = process.add_noise(z0, eps, t)
    assert torch.allclose(process.x0_hat(process.target(z0, eps, t), x_t, t), z0, atol=1e-4)
