"""`dsv3c`: one command line over models, export, passes and runtimes.

Each subcommand is a small module in this package with `NAME`, `HELP`, `add_arguments(parser)` and
`run(args) -> int`, listed once in COMMANDS. A UserError becomes one line on stderr and exit code 2.
SIGINT and SIGTERM end a command with one line and exit code 130 / 143; the artifact package's
atomic writes remove what was being written, so no output is left half-written.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from dsv3c import progress
from dsv3c.cli.paths import check_path_arguments
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


class Interrupted(KeyboardInterrupt):
    """SIGINT. A subclass on purpose: CPython ends the process through SIGINT (not exit code 130) when a plain
    KeyboardInterrupt passed through C code that runs Python (PyRun_*), even when it was caught later."""


class Terminated(BaseException):
    """SIGTERM as an exception, like Interrupted, so that outputs being written are removed."""


# the signals received: their exception can be replaced by an error of the code it interrupted (torch
# raises "trying to pop from empty mode stack" when SIGINT lands inside its mode-stack bookkeeping)
_received: list[int] = []


def _interrupt(signum: int, frame: object) -> None:
    _received.append(signum)
    raise Interrupted


def _terminate(signum: int, frame: object) -> None:
    _received.append(signum)
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    handlers = {signal.SIGINT: _interrupt, signal.SIGTERM: _terminate}
    _received.clear()  # main runs more than once in one process (the tests): only this run's signals count
    previous = {s: signal.getsignal(s) for s in handlers}
    for s, handler in handlers.items():
        if previous[s] is not signal.SIG_IGN:  # a signal the caller ignores (a background job) stays ignored
            signal.signal(s, handler)
    try:
        return _main(argv)
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line usage error
    args.argv = ["dsv3c", *(sys.argv[1:] if argv is None else argv)]  # what a result file records as its command
    # --json (or --format json) output is machine-read: no progress bars, whatever the terminal
    machine_read = bool(getattr(args, "json", False)) or getattr(args, "format", None) == "json"
    try:
        check_path_arguments(args)  # a name too long or a link loop: one line here, not a traceback later
        with progress.session(quiet=machine_read):
            return int(args._run(args))
    except UserError as e:
        print(f"dsv3c {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsv3c {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"dsv3c {args.command}: terminated", file=sys.stderr)
        return 143
    except Exception:
        if not _received:
            raise
        # the signal's exception became another on its way out: still the signal's one line and exit code
        terminated = _received[-1] == signal.SIGTERM
        print(f"dsv3c {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
