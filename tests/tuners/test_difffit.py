"""DiffFit (--trainable difffit): the parameter set, the scale factors, and their exact fold into stock weights."""

import pytest
import torch
from safetensors.torch import load_file

from launch import tiny_run_args, train_in_process
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline
from sadm_finetune.tuners.difffit import SCALE_NAME, attach_difffit, folded_copy


def _tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    return model.eval()  # no class-label dropout: outputs are deterministic


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 1000])


def test_trainable_set_is_biases_norms_class_embeddings_and_scales():
    model = _tiny_dit()
    names = attach_difffit(model)
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(n.endswith(SCALE_NAME) for n in names) == 2 * 2  # attention + feed-forward, 2 blocks
    assert any("class_embedder.embedding_table" in n for n in names)
    for n in names:
        assert n.endswith((".bias", SCALE_NAME, "embedding_table.weight")), n
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.endswith("attn1.to_q.weight") for n in frozen) and any(n.endswith("ff.net.2.weight") for n in frozen)
    # besides the (per-block, 1001-row) class tables, a small fraction of the weights trains
    count = lambda keep: sum(p.numel() for n, p in model.named_parameters() if keep(n, p))  # noqa: E731
    not_table = lambda n: "embedding_table" not in n  # noqa: E731
    assert count(lambda n, p: p.requires_grad and not_table(n)) < 0.05 * count(lambda n, p: not_table(n))


def test_scales_start_as_identity_and_fold_exactly_into_stock_weights():
    base = _tiny_dit()
    model = _tiny_dit()
    attach_difffit(model)
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.allclose(model(x, t, y).sample, base(x, t, y).sample, atol=1e-6)  # gamma = 1: unchanged
        for name, p in model.named_parameters():
            if name.endswith(SCALE_NAME):
                p.copy_(torch.rand(p.shape) + 0.5)
        trained = model(x, t, y).sample
        folded = folded_copy(model)
        assert torch.allclose(folded(x, t, y).sample, trained, atol=1e-5)
        assert not torch.allclose(trained, base(x, t, y).sample, atol=1e-3)
    assert set(folded.state_dict()) == set(base.state_dict())  # stock keys, no scale parameters left
    assert not any(folded_hooks for m in folded.modules() for folded_hooks in m._forward_hooks.values())
    assert any(n.endswith(SCALE_NAME) for n, _ in model.named_parameters())  # the original is untouched


def test_gradients_reach_only_the_difffit_set():
    model = _tiny_dit()
    attach_difffit(model)
    x, t, y = _inputs()
    model(x, t, y).sample.pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(SCALE_NAME))


@pytest.mark.slow
def test_difffit_run_exports_a_stock_pipeline_with_only_folded_changes(tmp_path, stock_diffusers):
    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=4)
    out = tmp_path / "out"
    proc = train_in_process(tiny_run_args(base, data, out, steps=3) + ["--trainable", "difffit",
                                                                       "--learning_rate", "5e-2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = load_file(str(base / "transformer" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(before) == set(after)  # the file holds stock keys only
    changed = {k for k in before if not torch.allclose(before[k], after[k])}
    # frozen matrices stay bit for bit; the output projections change only through the folded scales
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("to_q.weight"))
    assert any(k.endswith("attn1.to_out.0.weight") for k in changed)
    assert any(k.endswith(".bias") for k in changed)
    # the folded scale is per output row: each row of W' is a multiple of the base row
    key = next(k for k in changed if k.endswith("attn1.to_out.0.weight"))
    ratio = after[key] / before[key]
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=1e-4)
    assert stock_diffusers.load(out) == {"cls": "DiTPipeline", "labels": {"class_0": 0, "class_1": 1},
                                         "sadm_finetune_imported": False}
