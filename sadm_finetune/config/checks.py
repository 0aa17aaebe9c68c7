"""Value checks shared by the config sections (the run's own and the loss terms'): one-line ConfigErrors."""

from __future__ import annotations

from typing import Any

from ..utils.errors import ConfigError


def positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= 0:
            raise ConfigError(name, f"must be > 0, got {value}", f"set --{name} to a positive number")


def non_negative(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < 0:
            raise ConfigError(name, f"must be >= 0, got {value}", f"set --{name} to 0 or more")
