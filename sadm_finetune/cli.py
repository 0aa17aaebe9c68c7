"""Command line: flags derived from the config dataclasses; `--config` YAML, then flags, override the defaults
(the dataclasses', then the pipeline family's: config/run.build_config)."""

from __future__ import annotations

from . import cpu_wait  # noqa: F401  (first: OMP_WAIT_POLICY before anything imports torch)

import argparse
import sys
from typing import Any

from .config.run import SECTIONS, RunConfig, build_config, load_yaml
from .utils.errors import SADMError
from .config.flags import FlagParser, add_dataclass_flags
from .utils.quiet import silence_known_noise

USAGE = "sadm-train [--config YAML] [--dry_run] [--<field> VALUE ...]   (sadm-train --help lists every field)"


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="sadm-train",
        usage=USAGE,
        description="Fine-tune a diffusers pipeline with SADM (structure-guided adversarial training). "
        "Every field of the run configuration is a flag; precedence: defaults < the pipeline family's defaults "
        "(docs/defaults.md) < --config YAML < flags. "
        "Boolean switches have a --no_<name> form to turn a default off.",
    )
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="YAML recipe; flags given on the command line override it.")
    parser.add_argument("--dry_run", action="store_true", help="Print the resolved config and exit.")
    add_dataclass_flags(parser, SECTIONS)
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "dry_run")})
    return build_config(values), args


def main(argv: list[str] | None = None) -> int:
    silence_known_noise()
    try:
        config, args = parse_config(argv)
        if args.dry_run:
            print(config.to_yaml(), end="")
            return 0
        from .train.entry import train  # heavy imports only once the config is known to be good

        train(config, argv=sys.argv[1:] if argv is None else argv)
    except SADMError as e:
        print(f"sadm-train: error: {e}", file=sys.stderr)
        return _exit_distributed(2)
    return _exit_distributed(0)


def _exit_distributed(code: int) -> int:
    """A process of a multi-process run ends here, everything written and flushed, without tearing down the
    gloo/NCCL process group: its destructor can deadlock against the backend's worker threads (seen with 2
    CPU processes on torch 2.13; train/finish.end_training leaves the group for this exit). Global state kept on
    purpose (docs/design.md §12). A single process returns normally."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import logging
        import os

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
