"""The folder a command's `--dump-dir` writes its stage dumps into: whole or not at all.

The dumps (every graph after every stage, passes/stages.py) are written into a hidden temporary sibling of
the folder and renamed into place only when the command succeeds (artifact/atomic.py), so a failed or
interrupted run leaves no half-written dump. The folder is marked as dsv3c's, so `--force` may replace it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from dsv3c.artifact.atomic import atomic_folder, write_checkpoint_marker


@contextlib.contextmanager
def stage_dumps(target: Path | None, force: bool, inputs: Iterable[Path | None]) -> Iterator[Path | None]:
    """Yield the folder to dump into (None when no `--dump-dir` was given); overlaps with `inputs` (the
    command's inputs and outputs) are refused before anything is written."""
    if target is None:
        yield None
        return
    with atomic_folder(target, force, inputs=inputs) as tmp:
        yield tmp
        write_checkpoint_marker(tmp, "stage dumps (--dump-dir)")
