"""Calibration batches from text for `quantize --calibrate N --calibration-data TEXT`.

The same fixed windows `dsv3c eval` scores (eval.text), grouped into N batches, tokenized with the
export's tokenizer.json (or that of the checkpoint it was exported from).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dsv3c.artifact.manifest import read_manifest
from dsv3c.eval.text import eval_windows
from dsv3c.eval.tokens import find_tokenizer

WINDOWS_PER_BATCH = 4
WINDOW = 64  # tokens per window: long enough that attention sees real context


def calibration_batches(export_dir: Path, data: Path, batches: int) -> list[np.ndarray]:
    """Up to `batches` batches of [WINDOWS_PER_BATCH, WINDOW] token ids (fewer when the text is short)."""
    vocab = int(read_manifest(export_dir).config["vocab_size"])
    windows = eval_windows(data, find_tokenizer(export_dir), vocab, WINDOW, batches * WINDOWS_PER_BATCH * WINDOW)
    return [windows[i : i + WINDOWS_PER_BATCH] for i in range(0, len(windows), WINDOWS_PER_BATCH)]
