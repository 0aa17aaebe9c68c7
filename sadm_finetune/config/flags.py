"""Command-line flags derived from config dataclasses: one builder for sadm-train and sadm-eval.

Every field becomes ``--<name>`` typed from its annotation (bools are switches with a ``--no_<name>``
form, Literals are choices, lists take several values, ``none``/``null`` is None where the field
admits it). Flags the user did not give are absent from the parsed namespace, so a YAML recipe or the
dataclass default fills them. Abbreviations are off (``--max_train_step`` is an error, not
``--max_train_steps``); an unknown flag is one line that names the closest real flag.

Why not transformers' ``HfArgumentParser`` over the same dataclasses (measured with transformers 5.25 on
sadm-train's 142 fields; docs/design.md, "Config"): it fills every field's default into the namespace, so the
flags the user gave cannot be told apart from defaults, which the precedence defaults < family defaults < YAML <
flags needs; it adds ``--no_<name>`` only to bools whose default is True (20 switches lost, ``--no_center_crop``
over a YAML ``true`` among them) and makes ``bool | None`` fields (``--use_ema``) take a value, with no
``--no_use_ema``; ``none`` cannot set an ``int | None`` / ``float | None`` field (``--seed none``,
``--max_grad_norm none`` exit) and is the string "none" for a ``str | None`` one; bool flags accept a value
(``--random_flip true``); its help formatter fails on a ``%`` in a help text; it adds a hyphenated twin of every
flag (284 option strings for 166); it rewrites each ``Field.type`` of the dataclasses in place (process-wide
state); errors are argparse's usage text and exit, unknown flags a ValueError listing them, with no suggestion;
and ``parse_args_into_dataclasses`` reads a ``<script>.args`` file beside ``sys.argv[0]`` when one exists. Its
YAML reader takes flat keys only, without type checks. Bridging these means overriding most of it, so the
layer here (this file and fields.py) stays.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from typing import Any, Literal, Sequence

from ..utils.errors import ConfigError
from .fields import field_default, is_optional

_SUPPRESS = argparse.SUPPRESS


class FlagParser(argparse.ArgumentParser):
    """argparse without abbreviations, whose errors are one line (a ConfigError) instead of usage text."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self.required_fields: list[str] = []  # checked after unknown flags, so a typo is named first

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError("arguments", message, f"see {self.prog} --help")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._unrecognized(extras)
        missing = [f"--{name}" for name in self.required_fields if not hasattr(parsed, name)]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return parsed

    def _unrecognized(self, extras: list[str]) -> typing.NoReturn:
        flags = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
        if not flags:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        known = sorted(s for s in self._option_string_actions if s.startswith("--"))
        close = difflib.get_close_matches(flags[0], known, n=1)
        fix = f"did you mean {close[0]}? (see {self.prog} --help)" if close else f"see {self.prog} --help"
        raise ConfigError(flags[0], "unrecognized argument", fix)


def _default_text(f: dataclasses.Field, nullable: bool, inner: Any) -> str:
    value = field_default(f)
    if value is dataclasses.MISSING:
        return "(required)"
    if inner is bool:
        if value is None:  # decided at run time; the help text says how
            return f"(default: auto; --{f.name} / --no_{f.name} decide)"
        return f"(default: on; --no_{f.name} turns it off)" if value else "(default: off)"
    if value is None:
        return "(default: none)"
    if isinstance(value, list):
        return "(default: " + " ".join(str(v) for v in value) + ")"
    if isinstance(value, dict):
        return "(default: " + ",".join(f"{k}={v}" for k, v in value.items()) + ")"
    return f"(default: {value})"


class _MappingAction(argparse.Action):
    """``KEY=VALUE`` arguments (each may hold several pairs joined by commas) into a dict, values typed."""

    def __init__(self, *args: Any, value_type: type = str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.value_type = value_type

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        mapping = {}
        for pair in (p for value in values for p in value.split(",") if p):
            key, sep, text = pair.partition("=")
            try:
                mapping[key.strip()] = self.value_type(text)
                if not sep or not key.strip():
                    raise ValueError
            except ValueError:
                raise ConfigError(self.dest, f"{pair!r} is not KEY={self.value_type.__name__.upper()}",
                                  f"write e.g. --{self.dest} attn1.to_q={self.value_type(16)},ff.net.2="
                                  f"{self.value_type(4)}") from None
        setattr(namespace, self.dest, mapping)


def add_field(parser: FlagParser, group: argparse._ActionsContainer, f: dataclasses.Field, tp: Any) -> None:
    """One ``--<name>`` flag (and its aliases) for a dataclass field annotated ``tp``."""
    name = f.name
    flags = [f"--{name}", *f.metadata.get("aliases", [])]
    nullable, inner = is_optional(tp)
    help_text = f"{f.metadata.get('help', '')} {_default_text(f, nullable, inner)}".strip().replace("%", "%%")
    if field_default(f) is dataclasses.MISSING:
        parser.required_fields.append(name)
    common = dict(dest=name, default=_SUPPRESS, help=help_text)
    if inner is bool:
        group.add_argument(*flags, action="store_const", const=True, **common)
        group.add_argument(f"--no_{name}", dest=name, action="store_const", const=False, default=_SUPPRESS,
                           help=_SUPPRESS)
        return
    origin = typing.get_origin(inner)
    if origin is Literal:
        group.add_argument(*flags, choices=list(typing.get_args(inner)), **common)
        return
    if origin is list:
        (item,) = typing.get_args(inner)
        group.add_argument(*flags, type=item, nargs="+", metavar=item.__name__.upper(), **common)
        return
    if origin is dict:  # KEY=VALUE pairs, as several arguments and/or joined by commas: a=16,b=4
        group.add_argument(*flags, type=str, nargs="+", metavar="KEY=VALUE", action=_MappingAction,
                           value_type=typing.get_args(inner)[1], **common)
        return

    def parse(text: str, _inner=inner) -> Any:
        if nullable and text.lower() in ("none", "null"):
            return None
        return _inner(text)

    parse.__name__ = inner.__name__  # argparse names the type in its error message
    group.add_argument(*flags, type=parse, metavar=inner.__name__.upper(), **common)


def add_dataclass_flags(parser: FlagParser, sections: dict[str, type]) -> None:
    """A flag per field of each dataclass, in one argument group per section (titled by its name)."""
    for section, cls in sections.items():
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            add_field(parser, group, f, hints[f.name])
