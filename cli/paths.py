"""Path arguments the file system cannot look up at all: a name too long for it, a symbolic-link loop.

Checked once for every path on a command line (cli/main.py), before the command runs, so that a command's
own checks (missing, not a folder, not dsv3c's) meet only paths that `exists()` and `resolve()` can answer:
on Python 3.11 they raise OSError and RuntimeError for these instead of saying no.
"""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import PurePath

from dsv3c.errors import UserError

_MISSING = (errno.ENOENT, errno.ENOTDIR)  # no such path: the command itself says what it expected there


def check_path_arguments(args: argparse.Namespace) -> None:
    """UserError for the first path argument (or list item) the file system cannot look up."""
    for value in vars(args).values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, PurePath):
                check_usable(item)


def check_usable(path: PurePath) -> None:
    try:
        os.stat(path)
    except OSError as e:
        if e.errno in _MISSING:
            return
        raise UserError(f"{_shown(path)}: not a usable path ({e.strerror or e})") from None
    except ValueError as e:  # a NUL byte (only from Python callers: a command line cannot hold one)
        raise UserError(f"{_shown(path)}: not a usable path ({e})") from None


def _shown(path: PurePath) -> str:
    text = str(path)
    return text if len(text) <= 80 else f"{text[:80]}..."
