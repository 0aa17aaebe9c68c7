"""Auxiliary loss terms on one contract (terms.base.Term), registered by name (terms.registry) and built from the
run's config. Importing this package registers the built-in terms, in the order of the checkpoint layout."""

from __future__ import annotations

from .base import StepContext, Term, Update, UpdateResult
from .registry import TermConfig, check_requirements, register_term, term_sections, unregister_term
from .repa.config import RepaConfig
from .sadm.config import SADMConfig
from .sddit.config import SDDiTConfig

__all__ = ["StepContext", "Term", "TermConfig", "Update", "UpdateResult", "build_terms", "check_requirements",
           "check_terms", "register_term", "term_sections", "unregister_term"]

# The order is the checkpoint layout's (accelerate's prepared lists): never reorder, append new terms.
register_term("sadm", SADMConfig)
register_term("repa", RepaConfig)
register_term("sddit", SDDiTConfig)


def build_terms(config, adapter, process, autocast) -> list[Term]:
    """The terms a config asks for, section by section in registration order (the checkpoint layout depends on it);
    each term knows its section (`Term.section`)."""
    terms: list[Term] = []
    for name, section in config.term_sections.items():
        for term in section.build(config, adapter, process, autocast):
            term.section = name
            terms.append(term)
    return terms


def check_terms(config, adapter, accelerator) -> None:
    """The terms' one-line config checks that need the loaded model, before any heavy work (latent caching)."""
    for section in config.term_sections.values():
        section.check_model(config, adapter, accelerator)
