"""Start expert-parallel ranks as torchrun does (one process per rank, RANK/WORLD_SIZE/MASTER_* set).

Ranks are forked from the test process (torch is imported once, not once per rank: the machine has two
cores), then each sets the environment torchrun would give it and runs `parallel_worker.rank_main` (or
`entry`).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from .parallel_worker import rank_main


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The ranks run with one thread; so does the single-process reference (and the setting is put back)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class RankResult:
    rank: int
    exitcode: int | None
    error: str  # the one-line error the rank reported, "" if none


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",  # two cores shared by every process on the machine
    }


def _child(env: dict[str, str], entry: Callable[..., int], kwargs: dict[str, Any]) -> None:
    os.environ.update(env)
    os._exit(entry(**kwargs))


def launch(
    world: int,
    source: Path,
    out: Path,
    ep: int | None = None,
    started: Sequence[int] | None = None,
    wait_for: Sequence[int] | None = None,
    timeout: float = 50.0,
    entry: Callable[..., int] = rank_main,
    **faults: Any,
) -> list[RankResult]:
    """Run ranks `started` (default: all) of a `world`-rank group on `source` with --ep `ep` (default: world).

    Waits for the ranks in `wait_for` (default: all started), then kills the rest. AssertionError when a
    waited-for rank is still running after `timeout` seconds: a hang.
    """
    port = free_port()
    ctx = multiprocessing.get_context("fork")
    procs = {}
    for r in range(world) if started is None else started:
        kwargs = {"source": source, "out": out, "ep": world if ep is None else ep, **faults}
        procs[r] = ctx.Process(target=_child, args=(rank_env(r, world, port), entry, kwargs))
        procs[r].start()
    results = []
    try:
        for r in procs if wait_for is None else wait_for:
            procs[r].join(timeout)
            if procs[r].is_alive():
                raise AssertionError(f"rank {r} still running after {timeout} s: a hang")
            err = out / f"rank{r}.err"
            results.append(RankResult(r, procs[r].exitcode, err.read_text() if err.exists() else ""))
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join()
    return results
