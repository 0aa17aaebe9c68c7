"""The LoRA options trainers expect: --lora_type (LoRA, DoRA, LoHa, LoKr), per-module ranks and alphas
(--lora_rank_pattern / --lora_alpha_pattern), and the optimizers (--optimizer / --disc_optimizer: AdamW, 8-bit
AdamW, Prodigy). The files a run writes are read by the stock loader a user has (diffusers' `load_lora_weights`,
its kohya reader), and the base plus the file computes what the trained model computes."""

import copy
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from sadm_finetune.cli import parse_config
from sadm_finetune.config.run import ModelConfig, RunConfig, TrainingConfig, build_config, load_yaml
from sadm_finetune.terms.sadm.config import SADMConfig
from sadm_finetune.diffusion.process import DDPMProcess
from sadm_finetune.families.loading import load_family
from sadm_finetune.train import optimizers
from sadm_finetune.tuners import lora
from sadm_finetune.tuners.kohya import KOHYA_WEIGHT_NAME
from sadm_finetune.utils.errors import ConfigError
from tiny_sd import build_tiny_sd_pipeline

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]  # attention projections and a convolution
T = torch.tensor([10, 600])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("lora-options") / "sd")


def _trained(base, tmp_path, **options):
    """The adapter, its UNet with a random (trained-looking) adapter of the given options, and the files
    `save_lora_weights` wrote for it."""
    model = ModelConfig(pretrained_model_name_or_path=str(base), trainable="lora", lora_rank=4, lora_alpha=8.0,
                        lora_target_modules=TARGETS, **options)
    adapter = load_family(model)
    config = lora.make_lora_config(model, adapter.lora_target_modules)
    trained = lora.attach_lora(copy.deepcopy(adapter.denoiser), config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_magnitude_vector" in name:  # DoRA's magnitudes start at the weights' norms: move them
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.requires_grad:
                p.normal_(std=0.1, generator=g)
    state = lora.lora_state_dict(trained)
    written = adapter.save_lora_weights(tmp_path, state, lora.lora_metadata(config)) if adapter.lora_formats(
        model) else {}
    return adapter, model, config, trained, state, written


def _out(adapter, model):
    g = torch.Generator().manual_seed(1)
    latents, cond = torch.randn(2, 4, 8, 8, generator=g), {"encoder_hidden_states": torch.randn(2, 16, 32, generator=g)}
    with torch.no_grad():
        return adapter.predict(model.eval(), latents, T, cond).model_pred


def _stock(base, folder, weight_name=lora.LORA_WEIGHT_NAME):
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(folder, weight_name=weight_name)
    return pipe.unet


def test_dora_file_loads_with_stock_load_lora_weights(base, tmp_path):
    adapter, model, config, trained, state, written = _trained(base, tmp_path, lora_type="dora")
    assert isinstance(config, LoraConfig) and config.use_dora
    assert written == {"diffusers": lora.LORA_WEIGHT_NAME}  # no kohya file: its format has no magnitudes
    assert sum("lora_magnitude_vector" in k for k in state) == sum(".lora_A." in k for k in state) > 0
    unet = _stock(base, tmp_path)
    applied = get_peft_model_state_dict(unet, adapter_name="default_0")
    assert applied.keys() == state.keys() and all(torch.equal(applied[k], state[k]) for k in state)
    expected = _out(adapter, trained)
    torch.testing.assert_close(_out(adapter, unet), expected, rtol=1e-5, atol=1e-5)
    assert (expected - _out(adapter, adapter.denoiser)).abs().max() > 1e-3
    # The export samples through this loader and checks every tensor (the magnitudes too) was applied.
    assert adapter.lora_pipeline(tmp_path, lora.LORA_WEIGHT_NAME).unet is not adapter.denoiser
    merged = lora.merge_lora(adapter.load_component("unet"), config, state)  # --export_merged
    torch.testing.assert_close(_out(adapter, merged), expected, rtol=1e-5, atol=1e-5)


def test_rank_and_alpha_patterns_round_trip_through_both_files(base, tmp_path):
    # 4 attention blocks (self and cross: to_q, to_k, to_v, to_out.0) and their 4 proj_in convolutions
    ranks, alphas = {"attn1.to_q": 2, "proj_in": 6}, {"to_v": 3.0, "attn2.to_k": 16.0}
    adapter, model, config, trained, state, written = _trained(base, tmp_path, lora_rank_pattern=ranks,
                                                               lora_alpha_pattern=alphas)
    assert written == {"diffusers": lora.LORA_WEIGHT_NAME, "kohya": KOHYA_WEIGHT_NAME}
    rank_of = {k.split(".lora_A.")[0]: v.shape[0] for k, v in state.items() if ".lora_A." in k}
    assert {m: r for m, r in rank_of.items() if r != 4} == {  # the file carries each module's rank in its shapes
        **{m: 2 for m in rank_of if m.endswith("attn1.to_q")}, **{m: 6 for m in rank_of if m.endswith("proj_in")}}
    assert len(rank_of) == 4 * (2 * 4 + 1) and sum(m.endswith("proj_in") for m in rank_of) == 4
    scales = {name: module.scaling["default"] for name, module in trained.named_modules()
              if isinstance(module, BaseTunerLayer)}
    assert {s for m, s in scales.items() if m.endswith("to_v")} == {3.0 / 4}
    assert {s for m, s in scales.items() if m.endswith("attn2.to_k")} == {16.0 / 4}
    assert {s for m, s in scales.items() if m.endswith("attn1.to_q")} == {8.0 / 2}
    expected = _out(adapter, trained)
    for name in (lora.LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):  # diffusers' file (metadata) and kohya's (.alpha)
        torch.testing.assert_close(_out(adapter, _stock(base, tmp_path, name)), expected, rtol=1e-5, atol=1e-5)
    # kohya's file: one .alpha (lora_alpha) everywhere, the pattern's alphas folded into lora_up (diffusers' kohya
    # reader applies no per-module .alpha), the ranks in the shapes.
    with safe_open(str(tmp_path / KOHYA_WEIGHT_NAME), "pt") as f:
        kohya = {k: f.get_tensor(k) for k in f.keys()}
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    assert sum(k.endswith(".alpha") for k in kohya) == len(rank_of)
    up = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn{}_{}.lora_up.weight"
    peft_b = "mid_block.attentions.0.transformer_blocks.0.attn{}.{}.lora_B.weight"
    for attn, proj, factor in ((1, "to_v", 3.0 / 8), (2, "to_k", 16.0 / 8), (1, "to_k", 1.0)):
        torch.testing.assert_close(kohya[up.format(attn, proj)], state[peft_b.format(attn, proj)] * factor)
    assert kohya["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape[0] == 6


@pytest.mark.parametrize("kind, cls, key", [("loha", LoHaConfig, "hada_w1_a"), ("lokr", LoKrConfig, "lokr_w1")])
def test_loha_and_lokr_train_and_export_merged(base, tmp_path, kind, cls, key):
    adapter, model, config, trained, state, written = _trained(base, tmp_path, lora_type=kind,
                                                               lora_rank_pattern={"proj_in": 2})
    assert isinstance(config, cls) and config.rank_pattern == {"proj_in": 2}
    assert any(key in k for k in state) and written == {} and not list(tmp_path.iterdir())
    assert type(adapter).lora_formats(model) == () and type(adapter).exports_pipeline(model)  # no stock loader
    expected = _out(adapter, trained)
    assert (expected - _out(adapter, adapter.denoiser)).abs().max() > 1e-3
    merged = lora.merge_lora(adapter.load_component("unet"), config, state)
    assert merged.state_dict().keys() == adapter.denoiser.state_dict().keys()  # a stock UNet
    torch.testing.assert_close(_out(adapter, merged), expected, rtol=1e-5, atol=1e-5)


def test_a_pattern_that_matches_no_adapted_module_is_refused(base):
    model = ModelConfig(pretrained_model_name_or_path=str(base), trainable="lora", lora_target_modules=["to_q"],
                        lora_alpha_pattern={"to_v": 2.0})  # to_v gets no adapter: peft would ignore the pattern
    adapter = load_family(model)
    with pytest.warns(RuntimeWarning, match="alpha_pattern keys did not match"), \
            pytest.raises(ConfigError, match="lora_alpha_pattern: 'to_v' matches none of the 8 modules"):  # peft warns
        lora.attach_lora(copy.deepcopy(adapter.denoiser), lora.make_lora_config(model, adapter.lora_target_modules))


def test_flags_and_yaml_give_the_patterns_and_bad_values_are_one_line(tmp_path):
    need = ["--pretrained", "x", "--train_data_dir", "d"]
    config, _ = parse_config(need + ["--trainable", "lora", "--lora_rank_pattern", "attn1.to_q=16,ff.net.2=4",
                                     "proj_in=2", "--lora_alpha_pattern", "to_v=1.5", "--lora_type", "dora",
                                     "--optimizer", "adamw_8bit", "--disc_optimizer", "prodigy"])
    m, t = config.model, config.training
    assert m.lora_rank_pattern == {"attn1.to_q": 16, "ff.net.2": 4, "proj_in": 2}
    assert m.lora_alpha_pattern == {"to_v": 1.5} and m.lora_type == "dora"
    assert (t.optimizer, t.disc_optimizer) == ("adamw_8bit", "prodigy")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(config.to_yaml())  # a mapping in YAML, read back the same
    assert build_config(load_yaml(recipe)) == config
    recipe.write_text("model:\n  trainable: lora\n  lora_rank_pattern: [to_q]\n")
    with pytest.raises(ConfigError, match="lora_rank_pattern: expected a mapping"):
        load_yaml(recipe)
    for argv, message in [
        (["--lora_rank_pattern", "to_q"], "lora_rank_pattern: 'to_q' is not KEY=INT"),
        (["--trainable", "lora", "--lora_rank_pattern", "to_q=0"], "lora_rank_pattern: to_q=0: values must be > 0"),
        (["--lora_type", "dora"], "lora_type: is a LoRA option"),
        (["--lora_alpha_pattern", "to_q=2"], "lora_alpha_pattern: is a LoRA option"),
        (["--trainable", "lora", "--lora_type", "loha", "--lora_dropout", "0.1"], "lora_dropout: .* loha has none"),
        (["--trainable", "lora", "--lora_type", "lokr", "--lora_export_format", "diffusers"],
         "lora_export_format: no stock diffusers loader reads lokr"),
        (["--trainable", "lora", "--lora_type", "dora", "--lora_export_format", "both"],
         "lora_export_format: kohya's LoRA format has no DoRA"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config(need + argv)


def test_a_missing_optimizer_package_is_one_line_naming_pip(monkeypatch):
    find_spec = optimizers.importlib.util.find_spec
    monkeypatch.setattr(optimizers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "prodigyopt" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="disc_optimizer: prodigy needs the prodigyopt package.*pip install "
                                          "prodigyopt"):
        TrainingConfig(disc_optimizer="prodigy")
    TrainingConfig(optimizer="adamw_8bit")  # bitsandbytes is there


def _step(opt, params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_each_optimizer_steps_and_its_state_resumes_exactly(name):
    """A step moves the weights; an optimizer rebuilt from `state_dict()` (what a checkpoint holds) takes the
    next step exactly as the original does. bitsandbytes 0.50's AdamW8bit runs on CPU: the large tensor's moments
    are 8-bit."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 96)), torch.nn.Parameter(torch.randn(8))]  # 6144 >= 4096 elements
    training = TrainingConfig(optimizer=name)
    lr = 1.0 if name == "prodigy" else 1e-3
    opt = optimizers.make_optimizer(name, params, lr, (0.9, 0.999), 0.01, 1e-8, training)
    expected_type = {"adamw": "AdamW", "adamw_8bit": "AdamW8bit", "prodigy": "Prodigy"}[name]
    assert type(opt).__name__ == expected_type
    before = [p.detach().clone() for p in params]
    for seed in range(3):
        _step(opt, params, seed)
    assert all((p - b).abs().max() > 0 for p, b in zip(params, before))
    if name == "adamw_8bit":
        assert opt.state[params[0]]["state1"].dtype == torch.uint8 and opt.state[params[1]]["state1"].dtype == \
            torch.float32
    if name == "prodigy":  # diffusers' scripts' defaults
        group = opt.param_groups[0]
        assert group["use_bias_correction"] and group["safeguard_warmup"] and group["decouple"]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = optimizers.make_optimizer(name, copies, lr, (0.9, 0.999), 0.01, 1e-8, training)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _step(opt, params, 7)
    _step(resumed, copies, 7)
    assert all(torch.equal(p, c) for p, c in zip(params, copies))


def test_the_discriminator_trains_with_disc_optimizer():
    from sadm_finetune.terms.sadm.term import SADMTerm

    process = DDPMProcess(DDPMScheduler(beta_schedule="linear").config, "cpu")
    adapter = SimpleNamespace(latent_channels=4, num_classes=0)
    small = dict(disc_width=8, disc_depth=2, disc_embed_dim=16)
    for name, expected in (("adamw", "AdamW"), ("prodigy", "Prodigy"), ("adamw_8bit", "AdamW8bit")):
        config = RunConfig(sadm=SADMConfig(**small), training=TrainingConfig(disc_optimizer=name))
        term = SADMTerm(config, adapter, process, 1e-8)
        assert type(term.optimizer).__name__ == expected
        group = term.optimizer.param_groups[0]
        assert group["betas"] == (0.5, 0.999) and group["weight_decay"] == 1e-4  # the disc_* options


def test_fsdp_refuses_the_denoiser_optimizers_it_does_not_shard_for():
    from sadm_finetune.train.entry import _check_distributed_type

    fsdp = SimpleNamespace(distributed_type="FSDP", mixed_precision="bf16", print=lambda *a, **k: None)
    for name in ("adamw_8bit", "prodigy"):
        with pytest.raises(ConfigError, match=f"^optimizer: {name} is not wired for FSDP"):
            _check_distributed_type(RunConfig(training=TrainingConfig(optimizer=name)), fsdp)
    _check_distributed_type(RunConfig(training=TrainingConfig(disc_optimizer="prodigy")), fsdp)  # D is replicated
