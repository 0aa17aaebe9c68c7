"""Typed dataclass fields as YAML keys: type descriptions, value checks, and reading a sectioned YAML file.

Generic over the dataclasses it is given (``sections``: name -> dataclass), so it depends on no
particular configuration; ``run.py`` (sadm-train's RunConfig) and ``flags.py`` (both CLIs) build on it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ..utils.errors import ConfigError


def help_field(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with help text (and optional CLI aliases); mutable defaults are copied."""
    metadata = {"help": help, **extra}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def positive(section: Any, *names: str) -> None:
    """The range check of a section's ``__post_init__``: each named field is None or > 0."""
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= 0:
            raise ConfigError(name, f"must be > 0, got {value}", f"set --{name} to a positive number")


def non_negative(section: Any, *names: str) -> None:
    """Each named field is None or >= 0."""
    for name in names:
        value = getattr(section, name)
        if value is not None and value < 0:
            raise ConfigError(name, f"must be >= 0, got {value}", f"set --{name} to 0 or more")


def is_optional(tp: Any) -> tuple[bool, Any]:
    """(whether ``tp`` admits None, the type without None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return True, args[0]
    return False, tp


def describe(tp: Any) -> str:
    """A type in words, for error messages: "one of 'a', 'b'", "a list of int or null"."""
    optional, inner = is_optional(tp)
    if typing.get_origin(inner) is Literal:
        text = "one of " + ", ".join(repr(a) for a in typing.get_args(inner))
    elif typing.get_origin(inner) is list:
        text = f"a list of {typing.get_args(inner)[0].__name__}"
    elif typing.get_origin(inner) is dict:
        text = f"a mapping of str to {typing.get_args(inner)[1].__name__}"
    else:
        text = f"a {inner.__name__}"
    return text + (" or null" if optional else "")


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Check (and minimally convert) a YAML value against the field's type; wrong types fail."""
    optional, inner = is_optional(tp)
    fix = f"set {name} to {describe(tp)}"
    if value is None:
        if optional:
            return None
        raise ConfigError(name, "may not be null", fix)
    origin = typing.get_origin(inner)
    if origin is Literal:
        if value not in typing.get_args(inner):
            raise ConfigError(name, f"got {value!r}", fix)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(name, f"expected a list, got {type(value).__name__} {value!r}", fix)
        (item_type,) = typing.get_args(inner)
        return [coerce(name, item_type, v) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a mapping, got {type(value).__name__} {value!r}", fix)
        key_type, value_type = typing.get_args(inner)
        return {coerce(name, key_type, k): coerce(name, value_type, v) for k, v in value.items()}
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"expected true/false, got {value!r}", fix)
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"expected an integer, got {value!r}", fix)
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"expected a number, got {value!r}", fix)
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {value!r}", fix)
        return value
    raise TypeError(f"unsupported config type {tp} for {name}")


def index_fields(sections: dict[str, type]) -> dict[str, tuple[str, dataclasses.Field]]:
    """Field name -> (section name, field); names must be unique across sections."""
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in sections.items():
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (section, f)
    return index


def field_default(f: dataclasses.Field) -> Any:
    """The dataclass default of a field (MISSING when it has none)."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def read_yaml(path: str | Path, sections: dict[str, type], program: str = "sadm-train") -> dict[str, Any]:
    """Read a recipe into a flat {field: value} mapping (sections or flat keys), checking every key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", f"file {str(path)!r} not found", "pass an existing YAML file to --config")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("config", f"{path} is not valid YAML{where}", "fix the YAML syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("config", f"{path} must hold a mapping of fields", "write `field: value` lines")
    index = index_fields(sections)
    hints = {name: typing.get_type_hints(cls) for name, cls in sections.items()}
    flat: dict[str, Any] = {}

    def put(key: str, value: Any, expected_section: str | None) -> None:
        if key not in index:
            raise ConfigError(key, f"unknown key in {path}", f"remove it or fix its spelling (see {program} --help)")
        section, _ = index[key]
        if expected_section is not None and section != expected_section:
            raise ConfigError(key, f"belongs to section {section!r}, not {expected_section!r}", f"move it under {section}:")
        flat[key] = coerce(key, hints[section][key], value)

    for key, value in raw.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(key, f"section in {path} must be a mapping", f"write `{key}:` then indented fields")
            for sub_key, sub_value in value.items():
                put(sub_key, sub_value, key)
        else:
            put(key, value, None)
    return flat
