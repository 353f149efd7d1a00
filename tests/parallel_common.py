"""Start expert-parallel ranks as torchrun does (one process per rank, RANK/WORLD_SIZE/MASTER_* set)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("parallel_worker.py")


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",  # two cores shared by every process on the machine
        MKL_NUM_THREADS="1",
    )
    return env


def launch(
    world: int, argv: Callable[[int], Sequence[str]], started: Sequence[int] | None = None, timeout: float = 50.0
) -> list[RankResult]:
    """Run `argv(rank)` for each rank in `started` (default: all) of a `world`-rank group; wait for all."""
    port = free_port()
    procs = {
        r: subprocess.Popen(
            list(argv(r)), env=rank_env(r, world, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for r in (range(world) if started is None else started)
    }
    results = []
    for r, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise AssertionError(f"rank {r} still running after {timeout} s: a hang") from None
        results.append(RankResult(r, proc.returncode, out, err))
    return results


def worker(source: Path, out: Path, ep: int, *extra: str) -> Callable[[int], list[str]]:
    return lambda r: [sys.executable, str(WORKER), str(source), str(out / f"rank{r}.pt"), "--ep", str(ep), *extra]
