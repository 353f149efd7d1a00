"""Argument types shared by several subcommands."""

from __future__ import annotations

import argparse


def thread_count(text: str) -> int:
    """--threads: an int >= 0 (0: the runtime's default)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a thread count >= 0 (0: the runtime's default), got {text!r}")
    return value


def seed(text: str) -> int:
    """--seed of numpy's random generators: an int >= 0 (numpy refuses negative seeds)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a seed >= 0, got {text!r}")
    return value
