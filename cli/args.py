"""Argument types shared by several subcommands."""

from __future__ import annotations

import argparse

# quantize --calibrate N: static scales are the largest |x| seen over N batches (of 4 windows x 64 tokens), which
# stops growing long before this; each batch runs every graph once, so a larger N only runs longer (for hours on
# a large model) and, with --calibration-data, holds N batches of token windows in memory.
MAX_CALIBRATION_BATCHES = 1024


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


def calibration_batches(text: str) -> int:
    """--calibrate: a number of batches from 0 (no calibration: online activation scales) to 1024."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_CALIBRATION_BATCHES:
        raise argparse.ArgumentTypeError(
            f"expected a number of batches from 1 to {MAX_CALIBRATION_BATCHES} (0: no calibration), got {text[:40]!r}"
        )
    return value
