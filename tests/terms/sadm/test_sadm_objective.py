import math

import pytest
import torch
from diffusers import DDPMScheduler

from sadm_finetune.terms.sadm.config import SADMConfig
from sadm_finetune.terms.sadm.relations import StructureLoss, relation_matrix, structure_sample_weights
from sadm_finetune.terms.sadm.discriminator import StructureDiscriminator
from sadm_finetune.diffusion.process import DDPMProcess
from sadm_finetune.terms.sadm.objective import SADMObjective


def unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.mark.parametrize("relation", ["cosine", "euclidean", "rbf"])
@pytest.mark.parametrize("distance", ["mse", "l1", "kl"])
def test_identical_structures_give_zero(relation, distance):
    e = unit(torch.randn(6, 16))
    loss, _ = StructureLoss(relation, distance)(e, e.clone(), torch.ones(6))
    assert loss.abs().item() < 1e-6


def test_hand_computed_mse_case():
    # Three 2-d unit embeddings: real at 0, 90, 180 degrees; fake all at 0 degrees.
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    fake = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    # R_real off-diagonal: (0,1)=0 (0,2)=-1 (1,2)=0; R_fake all 1. Squared diffs: 1, 4, 1 (each twice).
    loss, logs = StructureLoss("cosine", "mse")(real, fake, torch.ones(3))
    assert loss.item() == pytest.approx((1 + 4 + 1) / 3)
    assert logs["relation_fake_mean"].item() == pytest.approx(1.0)
    assert logs["relation_real_mean"].item() == pytest.approx(-1 / 3)
    # Pair weights sqrt(w_i w_j): with w = (1, 1, 0) only the pair (0, 1) keeps weight; mean over 6 entries.
    loss_w, _ = StructureLoss("cosine", "mse")(real, fake, torch.tensor([1.0, 1.0, 0.0]))
    assert loss_w.item() == pytest.approx(2 * 1 / 6)
    loss_l1, _ = StructureLoss("cosine", "l1")(real, fake, torch.ones(3))
    assert loss_l1.item() == pytest.approx((1 + 2 + 1) / 3)


def test_relations_shapes_and_normalisation():
    e = unit(torch.randn(5, 8))
    off = ~torch.eye(5, dtype=torch.bool)
    assert relation_matrix(e, "cosine").shape == (5, 5)
    assert relation_matrix(e, "euclidean")[off].mean().item() == pytest.approx(1.0, abs=1e-5)
    rbf = relation_matrix(e, "rbf")
    assert ((rbf[off] > 0) & (rbf[off] <= 1)).all()


def test_batch_of_one_is_refused():
    e = unit(torch.randn(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        StructureLoss()(e, e, torch.ones(1))


def test_min_snr_sample_weights():
    sched = DDPMScheduler(beta_schedule="linear")
    ac = sched.alphas_cumprod
    t = torch.tensor([0, 100, 500, 999])
    w = structure_sample_weights(t, ac, "min_snr", gamma=5.0)
    snr = ac[t] / (1 - ac[t])
    assert torch.allclose(w, torch.clamp(snr, max=5.0) / 5.0)
    assert w[0] == 1.0 and w[-1] < 1e-3
    assert structure_sample_weights(t, ac, "cutoff", t_cutoff=300).tolist() == [1, 1, 0, 0]
    assert structure_sample_weights(t, ac, "none").tolist() == [1, 1, 1, 1]


def _tiny_disc():
    torch.manual_seed(0)
    return StructureDiscriminator(in_channels=4, base_channels=8, num_blocks=2, embed_dim=16, spectral_norm=False)


def _objective(**kw):
    sched = DDPMScheduler(beta_schedule="linear")
    cfg = SADMConfig(timestep_weighting="none", **kw)
    return SADMObjective(cfg, DDPMProcess(sched.config, "cpu"))


def test_generator_gradient_reaches_the_denoiser_only_through_x0_hat():
    disc, obj = _tiny_disc(), _objective()
    latents = torch.randn(6, 4, 8, 8, requires_grad=True)
    x0_hat = torch.randn(6, 4, 8, 8, requires_grad=True)
    t = torch.randint(0, 1000, (6,))
    loss, logs = obj.generator_loss(disc, latents, x0_hat, t, None)
    loss.backward()
    assert x0_hat.grad is not None and x0_hat.grad.abs().sum() > 0
    assert latents.grad is None  # real side is a constant
    assert all(p.grad is None for p in disc.parameters())  # D frozen
    assert disc.training  # eval mode only inside the call


def test_one_generator_step_lowers_and_one_discriminator_step_raises_the_distance():
    disc, obj = _tiny_disc(), _objective()
    torch.manual_seed(1)
    latents = torch.randn(8, 4, 8, 8)
    t = torch.randint(0, 1000, (8,))
    fake = torch.randn(8, 4, 8, 8, requires_grad=True)

    def distance():
        with torch.no_grad():
            return obj.generator_loss(disc, latents, fake, t, None)[1]["structure_loss_g"].item()

    before = distance()
    loss, _ = obj.generator_loss(disc, latents, fake, t, None)
    loss.backward()
    with torch.no_grad():
        fake -= 0.5 * fake.grad / fake.grad.norm()
    after_g = distance()
    assert after_g < before
    assert all(p.grad is None for p in disc.parameters())  # the G step leaves D frozen

    opt = torch.optim.SGD(disc.parameters(), lr=0.05)
    fake.grad = None  # the G step's gradient must not make the checks below pass vacuously
    loss_d, logs = obj.discriminator_loss(disc, latents, fake, t, None)
    assert logs["structure_loss_d"].item() == pytest.approx(after_g, rel=1e-4)
    loss_d.backward()
    assert fake.grad is None  # D's loss takes x0_hat detached: nothing reaches the generator
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in disc.parameters())
    assert sum(p.grad.abs().sum().item() for p in disc.parameters()) > 0
    opt.step()
    assert distance() > after_g


def test_structure_weight_schedule():
    obj = _objective(structure_weight=0.1, structure_warmup_steps=10, disc_warmup_steps=5)
    assert obj.structure_weight(0) == 0.0 and obj.structure_weight(4) == 0.0
    assert obj.structure_weight(5) == pytest.approx(0.01)
    assert obj.structure_weight(14) == pytest.approx(0.1)
    assert obj.structure_weight(1000) == pytest.approx(0.1)
    cadence = _objective(disc_every=3)
    assert [cadence.is_disc_turn(s) for s in range(6)] == [True, False, False, True, False, False]


def test_gradient_penalty_is_added_and_finite():
    disc, obj = _tiny_disc(), _objective(disc_gradient_penalty=1.0)
    latents, fake = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.randint(0, 1000, (4,))
    loss, logs = obj.discriminator_loss(disc, latents, fake, t, None)
    assert logs["disc_gradient_penalty"].item() > 0
    assert math.isfinite(loss.item())
    loss.backward()


@pytest.mark.parametrize("relation", ["cosine", "euclidean", "rbf"])
@pytest.mark.parametrize("distance", ["mse", "l1", "kl"])
def test_gradients_are_finite_for_every_option(relation, distance):
    real = unit(torch.randn(6, 16))
    fake = unit(torch.randn(6, 16)).requires_grad_()
    loss, _ = StructureLoss(relation, distance)(real, fake, torch.rand(6))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(fake.grad).all() and fake.grad.abs().sum() > 0
