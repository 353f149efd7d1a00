"""Join the expert-parallel process group that torchrun started: gloo on CPU, NCCL on CUDA.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; each process takes the GPU of
its LOCAL_RANK. Every wait has a deadline: the group's timeout bounds the rendezvous and each collective,
so a rank that died or hangs turns into a one-line RankFailure on the others, never a hang.
"""

from __future__ import annotations

import contextlib
import os
import re
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from dsv3c.errors import UserError

Device = Literal["cpu", "cuda"]
DEFAULT_TIMEOUT_S = 300.0


class RankFailure(UserError):
    """Another rank died, hung past the timeout, or disagrees: reported in one line, like a UserError."""


@dataclass(frozen=True)
class RankGroup:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    timeout_s: float

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def first_line(e: BaseException) -> str:
    """The gist of a backend's error: its first sentence, without gloo's source-location prefix."""
    lines = str(e).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else type(e).__name__)
    return text.split(". ")[0][:200]


def join(ep: int, device: Device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> RankGroup:
    """Check the launch against --ep, then join the group (bounded by `timeout_s`)."""
    if ep < 1:
        raise UserError(f"--ep must be at least 1 (ranks, one process each), got {ep}")
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        raise UserError(
            f"--ep {ep} runs one process per rank; start it with torchrun --nproc-per-node {ep} -m dsv3c ... --ep {ep}"
        )
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", rank))
    if world != ep:
        raise UserError(
            f"--ep {ep}, but {world} processes were started (WORLD_SIZE={world}); "
            f"start --nproc-per-node {ep}, or pass --ep {world}"
        )
    if timeout_s <= 0:
        raise UserError(f"--ep-timeout must be positive, got {timeout_s}")
    if device == "cuda":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise UserError(f"rank {rank}: --device cuda needs GPU {local_rank} (LOCAL_RANK), this torch sees fewer")
        torch.cuda.set_device(local_rank)
        where, backend = torch.device("cuda", local_rank), "nccl"
    else:
        where, backend = torch.device("cpu"), "gloo"
    try:
        dist.init_process_group(
            backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=where if backend == "nccl" else None,
        )
    except (RuntimeError, ValueError) as e:  # DistStoreError on a rendezvous timeout is a RuntimeError
        raise RankFailure(
            f"rank {rank}: the {world} ranks did not all join within {timeout_s:.0f} s ({first_line(e)})"
        ) from None
    return RankGroup(rank, world, local_rank, where, backend, timeout_s)


def agree(group: RankGroup, what: str, value: str) -> None:
    """RankFailure unless every rank passes the same `value` (e.g. the model and plan they loaded)."""
    mine = torch.tensor([zlib.crc32(value.encode())], dtype=torch.int64, device=group.device)
    every = [torch.empty_like(mine) for _ in range(group.world)]
    try:
        dist.all_gather(every, mine)
    except RuntimeError as e:
        raise RankFailure(f"rank {group.rank}: a peer failed before generation started ({first_line(e)})") from None
    differ = [r for r, v in enumerate(every) if int(v) != int(mine)]
    if differ:
        raise RankFailure(f"rank {group.rank}: ranks {differ} loaded a different {what}; start every rank alike")


def leave(barrier: bool = False) -> None:
    """Leave the group. After a run that went well pass `barrier`: no rank then tears down its links while
    a peer still uses them (gloo can abort a process that exits under a live peer). Not after a failure:
    a stuck peer would make the barrier wait out the timeout."""
    if not dist.is_initialized():
        return
    if barrier:
        with contextlib.suppress(RuntimeError):
            dist.barrier()
    dist.destroy_process_group()
