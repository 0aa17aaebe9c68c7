"""Command line: flags derived from the config dataclasses; `--config` YAML, then flags, override defaults."""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any, Literal

from .config import RunConfig, _is_optional, build_config, field_index, field_type, load_yaml
from .errors import ConfigError, SADMError

_SUPPRESS = argparse.SUPPRESS


def _add_field(group: argparse._ArgumentGroup, name: str, tp: Any, help_text: str, aliases: list[str]) -> None:
    flags = [f"--{name}", *aliases]
    nullable, inner = _is_optional(tp)
    origin = typing.get_origin(inner)
    if inner is bool:
        group.add_argument(*flags, dest=name, action="store_const", const=True, default=_SUPPRESS, help=help_text)
        group.add_argument(f"--no_{name}", dest=name, action="store_const", const=False, default=_SUPPRESS,
                           help=argparse.SUPPRESS)
        return
    if origin is Literal:
        choices = list(typing.get_args(inner))
        group.add_argument(*flags, dest=name, choices=choices, default=_SUPPRESS, help=help_text)
        return
    if origin is list:
        (item,) = typing.get_args(inner)
        group.add_argument(*flags, dest=name, type=item, nargs="+", default=_SUPPRESS, help=help_text)
        return

    def parse(text: str, _inner=inner) -> Any:
        if nullable and text.lower() in ("none", "null"):
            return None
        return _inner(text)

    parse.__name__ = inner.__name__  # argparse names the type in its error message
    group.add_argument(*flags, dest=name, type=parse, default=_SUPPRESS, help=help_text)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming it (a ConfigError), not usage text."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError("arguments", message, "see sadm-train --help")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sadm-train",
        description="Fine-tune a diffusers pipeline with SADM (structure-guided adversarial training). "
        "Boolean switches have a --no_<name> form to turn a default off.",
    )
    parser.add_argument("--config", default=None, help="YAML recipe; flags given on the command line override it.")
    parser.add_argument("--dry_run", action="store_true", help="Print the resolved config and exit.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (section, f) in field_index().items():
        group = groups.setdefault(section, parser.add_argument_group(section))
        _add_field(group, name, field_type(section, name), f.metadata["help"], f.metadata.get("aliases", []))
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "dry_run")})
    return build_config(values), args


def main(argv: list[str] | None = None) -> int:
    try:
        config, args = parse_config(argv)
        if args.dry_run:
            print(config.to_yaml(), end="")
            return 0
        from .training import train  # heavy imports only once the config is known to be good

        train(config, argv=sys.argv[1:] if argv is None else argv)
    except SADMError as e:
        print(f"sadm-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
