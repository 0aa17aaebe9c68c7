"""terms/base.py: the term contract's defaults, the tracker tag of a term's skipped updates, and the masked
structure inputs."""

import torch

from sadm_finetune.terms.base import StepContext, Term


def context(loss_mask=None):
    z0 = torch.arange(8.0).reshape(2, 1, 2, 2)
    x0_hat = (z0 + 1).requires_grad_()
    return StepContext(0, {}, z0, z0, torch.zeros(2), z0, {}, z0, x0_hat, torch.Generator(), loss_mask=loss_mask)


def test_structure_inputs_are_masked_and_keep_the_graph():
    ctx = context()
    z0, x0_hat = ctx.structure_inputs()
    assert z0 is ctx.latents and x0_hat is ctx.x0_hat
    mask = torch.tensor([[1.0, 0.0], [0.5, 1.0]]).expand(2, 1, 2, 2)
    ctx = context(mask)
    z0, x0_hat = ctx.structure_inputs()
    assert torch.equal(z0, torch.arange(8.0).reshape(2, 1, 2, 2) * mask)
    assert torch.equal(x0_hat.detach(), (torch.arange(8.0).reshape(2, 1, 2, 2) + 1) * mask)
    x0_hat.sum().backward()
    assert torch.equal(ctx.x0_hat.grad, mask)  # the graph reaches x0_hat, through the mask


def test_a_terms_defaults_and_its_nonfinite_key():
    class Plain(Term):
        name = "plain"

    class WithModule(Term):
        name = "gan"

        def modules(self):
            return {"critic": (torch.nn.Linear(1, 1), None, None)}

    plain = Plain()
    assert plain.modules() == {} and plain.joint_modules() == {} and plain.state() == {}
    assert plain.log(context()) == {} and plain.phase(context(), None) == ({}, None) and plain.feature_blocks == ()
    assert plain.nonfinite_key == "nonfinite_plain_updates"
    assert WithModule().nonfinite_key == "nonfinite_critic_updates"


def test_the_per_sample_loss_is_the_loss_itself_when_per_sample_and_none_otherwise():
    ctx, term = context(), Term()
    per_sample = ctx.x0_hat.mean(dim=(1, 2, 3))
    assert term.per_sample_loss(ctx, per_sample) is per_sample
    assert term.per_sample_loss(ctx, per_sample.mean()) is None  # a scalar: not measurable by default
    assert term.per_sample_loss(ctx, torch.cat([per_sample, per_sample])) is None  # not one value per sample
