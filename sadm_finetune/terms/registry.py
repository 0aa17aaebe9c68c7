"""The loss-term registry: a term's config section, registered by name, is all the rest of the package knows of it.

`register_term(name, config_cls)` adds a dataclass (a `TermConfig`) as the run config's section `name`: its fields
become `--<field>` flags and keys of the YAML section `name:`, `RunConfig.<name>` holds it, and its methods build the
term(s) (terms.base.Term), check the config, and give the run summary, model card and kohya lines. Registration order
is the order of the terms in the step and in the checkpoint layout (built in: sadm, repa, sddit; never reorder them).
Light on purpose (no torch): the config imports it. docs/adding-a-term.md walks through a new term.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

from ..utils.errors import ConfigError


class TermConfig:
    """Base of a term's config section (subclasses are dataclasses). A weight field of 0 turns the term off."""

    section: ClassVar[str] = ""  # the registered name (set by register_term): YAML section and RunConfig attribute
    title: ClassVar[str] = ""  # the term in messages and summaries, e.g. "SD-DiT"
    weight_field: ClassVar[str] = ""  # the field whose value > 0 turns the term on (named in refusals)
    # Family capabilities the term needs (families/base.py FamilyAdapter.capabilities): a family lacking one refuses
    # the term before any weights load, in one line: "<title> needs <requirement>; <the family's reason>".
    requires: ClassVar[frozenset[str]] = frozenset()
    requirement: ClassVar[str] = ""
    requirement_fix: ClassVar[str] = ""  # the fix of that refusal (default: drop --<weight_field>)
    # Fields to lower when updates keep going non-finite (named in max_nonfinite_steps' error while the term is on).
    stability_fields: ClassVar[tuple[str, ...]] = ()

    @property
    def enabled(self) -> bool:
        return getattr(self, self.weight_field) > 0

    def build(self, config: Any, adapter: Any, process: Any, autocast: Callable) -> list:
        """The terms.base.Term objects this section asks for (none when off), built before accelerate's `prepare`."""
        raise NotImplementedError(f"{type(self).__name__} does not build its term")

    # Checks, each a one-line ConfigError naming the field and the fix, at three moments of a run's start:
    def check(self, config: Any) -> None:
        """Across sections, when the run config is built (RunConfig.validate)."""

    def check_accelerator(self, config: Any, accelerator: Any) -> None:
        """Against the launch (distributed type, mixed precision), before any weights load."""

    def check_family(self, config: Any, family: type) -> None:
        """Against the pipeline family (a FamilyAdapter class), before any weights load: by default, an enabled term
        whose `requires` the family's capabilities lack is refused."""
        missing = sorted(self.requires - getattr(family, "capabilities", frozenset())) if self.enabled else []
        if missing:
            raise ConfigError(self.weight_field, f"{self.title} needs {self.requirement}; "
                              f"{capability_gap(family, missing[0])}",
                              self.requirement_fix or f"drop --{self.weight_field}")

    def check_model(self, config: Any, adapter: Any, accelerator: Any) -> None:
        """Against the loaded model (e.g. a block index within the denoiser), before any heavy work."""

    # What the term needs from the data:
    def cache_companions(self, config: Any, accelerator: Any, adapter: Any, data: Any, folder: Any) -> list:
        """With --cache_latents: datasets of per-image tensors the term reads from the batch (REPA: its encoder's
        features), built beside the latent cache `folder` and indexed like it; none by default."""
        return []

    # What the run reports about the term:
    def summary_off(self) -> list[str]:
        """Run-summary lines while the term is off (the built terms give theirs: Term.summary_lines)."""
        return []

    def card_intro(self) -> str | None:
        """The model card's sentence on what the run trained with, or None."""
        return None

    def card_tags(self) -> list[str]:
        return []

    def card_table(self) -> tuple[str, list[tuple[str, Any]]] | None:
        """(heading, option rows) of the card's settings table for this term; by default all its fields when on."""
        if not self.enabled:
            return None
        return f"{self.title} settings", [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]

    def card_files(self) -> dict[str, str]:
        """Folders the term's exported modules are saved to (Term.export_modules), with what they are, for the card."""
        return {}

    def kohya_comment(self) -> str | None:
        """The term's part of a kohya LoRA file's `ss_training_comment`."""
        return None


_REGISTRY: dict[str, type] = {}


def register_term(name: str, config_cls: type | None = None):
    """Register `config_cls` (a TermConfig dataclass) as the term section `name`; a call, or a class decorator
    (`@register_term("mine")`). Field names must be unique across every section (they are the flags)."""

    def add(cls: type) -> type:
        if not (dataclasses.is_dataclass(cls) and issubclass(cls, TermConfig)):
            raise TypeError(f"register_term({name!r}): {cls.__name__} must be a dataclass subclassing TermConfig")
        if not name.isidentifier():
            raise ValueError(f"register_term: {name!r} is not an identifier (it is a YAML section and an attribute)")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"register_term: a term named {name!r} is already registered ({_REGISTRY[name].__name__})")
        fields = {f.name for f in dataclasses.fields(cls)}
        if cls.weight_field not in fields:
            raise TypeError(f"register_term({name!r}): weight_field {cls.weight_field!r} is not a field of "
                            f"{cls.__name__}")
        for other, other_cls in _REGISTRY.items():
            clash = fields & {f.name for f in dataclasses.fields(other_cls)} if other != name else set()
            if clash:
                raise ValueError(f"register_term({name!r}): fields {sorted(clash)} are already section {other!r}'s")
        cls.section = name
        _REGISTRY[name] = cls
        return cls

    return add if config_cls is None else add(config_cls)


def unregister_term(name: str) -> None:
    """Remove a registered term (tests register throwaway ones)."""
    del _REGISTRY[name]


def term_sections() -> dict[str, type]:
    """Section name -> config class of every registered term, in registration order."""
    return dict(_REGISTRY)


def capability_gap(family: type, capability: str) -> str:
    """Why `family` lacks `capability`, in the family's words (FamilyAdapter.lacks: its `capability_gaps`, else the
    generic wording) or, for a class that is no FamilyAdapter, generically."""
    lacks = getattr(family, "lacks", None)
    if lacks is not None:
        return lacks(capability)
    name = getattr(family, "display_name", "") or family.__name__
    return f"the {name} family does not declare {capability!r}"


def check_requirements(config: Any, family: type) -> None:
    """Each term's family check (TermConfig.check_family), before any weights load: one generic refusal of a term
    whose required capabilities the family lacks, in one line naming the term's weight field."""
    for section in config.term_sections.values():
        section.check_family(config, family)
