"""`dsv3c`: one command line over models, export, passes and runtimes.

Each subcommand is a small module in this package with `NAME`, `HELP`, `add_arguments(parser)` and
`run(args) -> int`, listed once in COMMANDS. A UserError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from dsv3c import progress
from dsv3c.errors import UserError

# module names under dsv3c.cli; imported lazily so optional backends never slow or break start-up
COMMANDS = [
    "init",
    "generate",
    "export",
    "quantize",
    "lower",
    "build",
    "inspect",
    "diff",
    "bench",
    "eval",
    "partition",
    "train",
]


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"dsv3c.cli.cmd_{name}")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (not argparse's usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dsv3c", description="A compiler for DeepSeek-V3-family models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = _load(name)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line usage error
    # --json (or --format json) output is machine-read: no progress bars, whatever the terminal
    machine_read = bool(getattr(args, "json", False)) or getattr(args, "format", None) == "json"
    try:
        with progress.session(quiet=machine_read):
            return int(args._run(args))
    except UserError as e:
        print(f"dsv3c {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsv3c {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
