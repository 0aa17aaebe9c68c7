"""Auxiliary loss terms on one contract (terms.base.Term), built from the run's config."""

from __future__ import annotations

from .base import StepContext, Term, Update, UpdateResult

__all__ = ["StepContext", "Term", "Update", "UpdateResult", "build_terms", "check_terms"]


def build_terms(config, adapter, process, autocast) -> list[Term]:
    """The terms a config asks for, in a fixed order (the checkpoint layout depends on it)."""
    from .sadm.objective import SADMObjective
    from .sadm.term import SADMTerm, StructureProbe
    from .sddit.term import SDDiTTerm

    terms: list[Term] = []
    if config.sadm.enabled:
        terms.append(SADMTerm(config, adapter, process, config.training.adam_epsilon))
    if config.sadm.structure_diagnostics:
        terms.append(StructureProbe(SADMObjective(config.sadm, process)))
    if config.repa.enabled:
        from .repa.term import RepaTerm

        terms.append(RepaTerm(config, adapter, autocast))
    if config.sddit.enabled:
        terms.append(SDDiTTerm(config, adapter, process, autocast))
    return terms


def check_terms(config, adapter, accelerator) -> None:
    """The terms' one-line config checks that need the loaded model, before any heavy work (latent caching)."""
    if config.repa.enabled:
        from .repa.term import RepaTerm

        RepaTerm.check(config, adapter, accelerator)
