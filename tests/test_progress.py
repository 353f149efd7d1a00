"""dsv3c.progress: bars on a terminal, nothing with quiet/--json or when stderr is not a terminal."""

from __future__ import annotations

import io
import time

import pytest
from dsv3c import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_tasks() -> list[int]:
    seen = []
    with progress.task("writing weights", total=3 * 2**20, unit="bytes") as t:
        for i in progress.track(range(3), "tensors"):
            t.update(description=f"writing tensor {i}")
            t.advance(2**20)
            seen.append(i)
            time.sleep(0.05)
    return seen


def test_bar_on_a_terminal_says_what_and_how_much(monkeypatch: pytest.MonkeyPatch) -> None:
    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    with progress.session(quiet=False):
        assert _run_tasks() == [0, 1, 2]
    out = err.getvalue()
    assert "writing tensor" in out and "tensors" in out
    assert "MiB" in out and "left" in out


@pytest.mark.parametrize("how", ["json", "quiet", "pipe"])
def test_silent_with_json_quiet_or_a_pipe(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    err = _Terminal() if how != "pipe" else io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    if how == "json":
        with progress.session(quiet=True):
            assert _run_tasks() == [0, 1, 2]
    elif how == "quiet":
        with progress.quiet():
            assert _run_tasks() == [0, 1, 2]
    else:
        with progress.session(quiet=False):
            assert _run_tasks() == [0, 1, 2]
    assert err.getvalue() == ""


def test_exception_inside_a_task_closes_the_display(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", _Terminal())
    with progress.session(quiet=False), pytest.raises(ValueError), progress.task("failing", total=2):
        raise ValueError("boom")
    assert progress._display._progress is None
