"""Progress bars for long commands: what is being done and how much is left, on stderr.

A floor like errors.py (imports only the standard library and rich), so every package can report progress
without depending on the CLI. Library code opens tasks; the CLI decides whether they are shown:

    with progress.task("writing weights", total=n_bytes, unit="bytes") as t:
        for tensor in tensors:
            ...
            t.advance(tensor.nbytes)

    for layer in progress.track(layers, "tracing layers"):
        ...

Bars are shown only when stderr is a terminal and no `quiet()` (or `session(quiet=True)`) is active, so
`--json`, pipes, CI logs and tests stay clean. Tasks nest: each open task is one line of the same display.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import (
    Task as RichTask,
)
from rich.text import Text

T = TypeVar("T")
Unit = Literal["items", "bytes"]

# None: decide from stderr; True/False: a session said so (the CLI's --json, or a caller's quiet())
_quiet: contextvars.ContextVar[bool | None] = contextvars.ContextVar("dsv3c_progress_quiet", default=None)


def _shown() -> bool:
    quiet = _quiet.get()
    if quiet is None:
        return sys.stderr.isatty()
    return not quiet


@contextmanager
def session(*, quiet: bool) -> Iterator[None]:
    """Within this block, bars are hidden when `quiet` (e.g. the command got --json); else shown on a
    terminal. The CLI opens one session per command."""
    token = _quiet.set(bool(quiet or not sys.stderr.isatty()))
    try:
        yield
    finally:
        _quiet.reset(token)


@contextmanager
def quiet() -> Iterator[None]:
    """No bars inside this block (for work whose output is machine-read, or nested helpers)."""
    token = _quiet.set(True)
    try:
        yield
    finally:
        _quiet.reset(token)


def _format_count(n: float, unit: str) -> str:
    if unit != "bytes":
        return f"{n:,.0f}"
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n:.0f} B"


class _CountColumn(ProgressColumn):
    """'3/12' for items, '1.2 GiB/4.0 GiB' for bytes: the task says which."""

    def render(self, task: RichTask) -> Text:
        unit = task.fields.get("unit", "items")
        done = _format_count(task.completed, unit)
        if task.total is None:
            return Text(done, style="progress.download")
        return Text(f"{done}/{_format_count(task.total, unit)}", style="progress.download")


class _Display:
    """One rich display shared by all open tasks; started with the first, stopped with the last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._open = 0

    def add(self, description: str, total: float | None, unit: Unit) -> tuple[Progress, TaskID]:
        with self._lock:
            if self._progress is None:
                self._progress = Progress(
                    SpinnerColumn(),
                    TextColumn("{task.description}"),
                    BarColumn(),
                    _CountColumn(),
                    TimeElapsedColumn(),
                    TextColumn("left"),
                    TimeRemainingColumn(),
                    console=Console(stderr=True),
                    transient=True,
                )
                self._progress.start()
            self._open += 1
            return self._progress, self._progress.add_task(description, total=total, unit=unit)

    def remove(self, task_id: TaskID) -> None:
        with self._lock:
            if self._progress is None:
                return
            self._progress.remove_task(task_id)
            self._open -= 1
            if self._open == 0:
                self._progress.stop()
                self._progress = None


_display = _Display()


class Task:
    """A handle on one line of progress; every method is a no-op when bars are hidden."""

    def __init__(self, progress: Progress | None, task_id: TaskID | None) -> None:
        self._progress = progress
        self._id = task_id

    def advance(self, amount: float = 1) -> None:
        if self._progress is not None and self._id is not None:
            self._progress.advance(self._id, amount)

    def update(self, *, description: str | None = None, total: float | None = None) -> None:
        """Say what is being done now (e.g. the tensor's name), or a total learned late."""
        if self._progress is not None and self._id is not None:
            self._progress.update(self._id, description=description, total=total)


@contextmanager
def task(description: str, total: float | None = None, *, unit: Unit = "items") -> Iterator[Task]:
    """One line of progress while the block runs: `description`, a bar when `total` is known, the count
    done/total (bytes shown in KiB..TiB with unit="bytes") and the time left."""
    if not _shown():
        yield Task(None, None)
        return
    progress, task_id = _display.add(description, total, unit)
    try:
        yield Task(progress, task_id)
    finally:
        _display.remove(task_id)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate `items` with one line of progress (total from len() when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(description, total) as t:
        for item in items:
            yield item
            t.advance()
