"""The term registry (terms/registry.py): a term defined here, registered by name and nowhere else, gets its flag, its
YAML section, its line in the dry run and the run summary, and trains a tiny DiT; a family lacking a capability a term
requires refuses it in one line before any weights load."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from launch import tiny_run_args, train_in_process
from safetensors.torch import load_file
from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

from sadm_finetune.config.fields import help_field
from sadm_finetune.config.run import RunConfig, SECTIONS, build_config, load_yaml
from sadm_finetune.families.base import FamilyAdapter
from sadm_finetune.families.dit import DiTAdapter
from sadm_finetune.terms import Term
from sadm_finetune.terms.registry import TermConfig, register_term, term_sections, unregister_term
from sadm_finetune.terms.repa.config import RepaConfig
from sadm_finetune.utils.errors import ConfigError


class ToyTerm(Term):
    """lambda * mean(x0_hat^2) per sample: pulls the predicted clean latents toward 0 (differentiable in the output)."""

    name = "toy"
    weight_key = "toy_weight"

    def __init__(self, config: "ToyConfig") -> None:
        self.config = config

    def weight(self, step: int) -> float:
        return self.config.toy_weight

    def loss(self, ctx):
        value = ctx.x0_hat.float().pow(2).mean(dim=(1, 2, 3))  # (B,)
        return value, {"loss_toy": value.mean().detach()}

    def summary_lines(self, denoiser) -> list[str]:
        return [f"toy: lambda {self.config.toy_weight}"]


@dataclass
class ToyConfig(TermConfig):
    title = "Toy"
    weight_field = "toy_weight"

    toy_weight: float = help_field(0.0, "The toy term's lambda; 0 turns it off.")

    def build(self, config, adapter, process, autocast) -> list:
        return [ToyTerm(self)] if self.enabled else []


@pytest.fixture
def toy():
    register_term("toy", ToyConfig)
    try:
        yield ToyConfig
    finally:
        unregister_term("toy")
    assert "toy" not in term_sections() and "toy" not in SECTIONS


def test_a_registered_term_gets_its_section_flag_and_yaml_keys(toy, tmp_path):
    assert list(term_sections())[:3] == ["sadm", "repa", "sddit"]  # the checkpoint layout's order
    assert list(SECTIONS)[-2:] == ["toy", "dreambooth"]
    config = build_config({"pretrained_model_name_or_path": "x", "train_data_dir": "d", "toy_weight": 0.5})
    assert config.toy.toy_weight == 0.5 and config.toy.enabled and config.to_dict()["toy"] == {"toy_weight": 0.5}
    assert RunConfig().toy == ToyConfig() and RunConfig(toy=ToyConfig(0.25)).toy.toy_weight == 0.25

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("toy:\n  toy_weight: 0.25\n")
    assert load_yaml(recipe) == {"toy_weight": 0.25}
    recipe.write_text("toy:\n  structure_weight: 0.25\n")
    with pytest.raises(ConfigError, match="^structure_weight: belongs to section 'sadm', not 'toy'"):
        load_yaml(recipe)

    proc = train_in_process(["--dry_run", "--pretrained", "x", "--train_data_dir", "d", "--toy_weight", "0.5"])
    assert proc.returncode == 0 and "\ntoy:\n  toy_weight: 0.5\ndreambooth:\n" in proc.stdout, proc.stderr[-2000:]


def test_registration_refuses_a_clashing_or_malformed_term(toy):
    @dataclass
    class Clash(TermConfig):
        weight_field = "toy_weight"
        toy_weight: float = 0.0

    with pytest.raises(ValueError, match="already registered"):
        register_term("toy", Clash)
    with pytest.raises(ValueError, match=r"fields \['toy_weight'\] are already section 'toy'"):
        register_term("clash", Clash)

    @dataclass
    class NoWeight(TermConfig):
        weight_field = "missing"
        other: float = 0.0

    with pytest.raises(TypeError, match="weight_field 'missing'"):
        register_term("no_weight", NoWeight)
    assert list(term_sections()) == ["sadm", "repa", "sddit", "toy"]


def _transformer(out) -> dict[str, torch.Tensor]:
    return load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")


def _scalars(out) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_registered_term_trains_the_denoiser(toy, tmp_path):
    """Two 2-step runs on a tiny DiT, SADM off, identical but for --toy_weight: the term is built, logged, in the
    summary, and changes the exported weights."""
    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2)
    data = build_image_folder(tmp_path / "data")
    common = ["--structure_weight", "0", "--no_structure_diagnostics", "--seed", "0", "--no_use_ema"]
    plain = train_in_process(tiny_run_args(base, data, tmp_path / "plain", steps=2) + common)
    toyed = train_in_process(tiny_run_args(base, data, tmp_path / "toy", steps=2) + common + ["--toy_weight", "10"])
    assert plain.returncode == 0 and toyed.returncode == 0, (plain.stderr + toyed.stderr)[-3000:]
    assert "toy: lambda 10.0" in toyed.stdout and "toy: lambda" not in plain.stdout
    logs = _scalars(tmp_path / "toy")
    assert len(logs["loss_toy"]) == 2 and all(v > 0 for v in logs["loss_toy"]) and logs["toy_weight"] == [10.0, 10.0]
    assert "loss_toy" not in _scalars(tmp_path / "plain")
    a, b = _transformer(tmp_path / "plain"), _transformer(tmp_path / "toy")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_a_family_lacking_a_required_capability_refuses_the_term_in_one_line(toy, monkeypatch):
    monkeypatch.setattr(ToyConfig, "requires", frozenset({"toy_capability"}))
    monkeypatch.setattr(ToyConfig, "requirement", "toy blocks")
    config = RunConfig(toy=ToyConfig(toy_weight=1.0))
    with pytest.raises(ConfigError, match=r"^toy_weight: Toy needs toy blocks; the DiT family does not declare "
                                          r"'toy_capability'; drop --toy_weight$") as error:
        DiTAdapter.check_config(config)
    assert "\n" not in str(error.value)
    DiTAdapter.check_config(RunConfig())  # off: no error
    monkeypatch.setattr(DiTAdapter, "capabilities", DiTAdapter.capabilities | {"toy_capability"})
    DiTAdapter.check_config(config)  # declared: accepted


def test_a_family_that_declares_nothing_refuses_the_optional_terms():
    class Bare(FamilyAdapter):
        display_name = "Bare"

    with pytest.raises(ConfigError, match=r"^repa_weight: REPA needs the denoiser's per-block hidden states on its "
                                          r"token grid; Bare's adapter exposes no per-block hidden states \(feature_blocks\)"):
        Bare.check_config(RunConfig(repa=RepaConfig(repa_weight=0.5)))
    with pytest.raises(ConfigError, match=r"^sddit_weight: SD-DiT needs a DiT-style transformer"):
        Bare.check_config(dataclasses.replace(RunConfig(), term_sections={"sddit": RunConfig().sddit.__class__(
            sddit_weight=0.1)}))
    with pytest.raises(ConfigError, match=r"^disc_class_conditional: Bare is unconditional and has no class labels"):
        Bare.check_config(RunConfig(sadm=RunConfig().sadm.__class__(disc_class_conditional=True)))
    Bare.check_config(RunConfig())  # SADM alone needs nothing of the family
