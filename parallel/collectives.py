"""The MoE's collectives as autograd functions, so that the same dispatch serves inference and training.

Every rank holds the same batch and computes the same loss (attention and everything but the routed
experts are replicated), so gradients must come out on every rank exactly as one process would have them:

- `to_slice` (forward: this rank's rows, no communication) takes its gradient back from every rank with
  all_gather: each rank only sees its slice's share of the routed path;
- `from_slices` (forward: all_gather) keeps only this rank's rows of its gradient: the loss, and so the
  gradient arriving here, is the same on every rank, and summing it over ranks would count it N times;
- `all_to_all` sends the gradient back the way the tensor came (split sizes swapped).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

Runner = Callable[[str, Callable[[], object]], None]  # runs one collective, turning a failure into a RankFailure


def _gather(runner: Runner, what: str, mine: torch.Tensor, world: int) -> torch.Tensor:
    slices = [torch.empty_like(mine) for _ in range(world)]
    runner(what, lambda: dist.all_gather(slices, mine.contiguous()))
    return torch.cat(slices)


class _ToSlice(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rank: int, world: int, chunk: int, runner: Runner) -> torch.Tensor:
        ctx.rank, ctx.world, ctx.chunk, ctx.runner, ctx.rows = rank, world, chunk, runner, x.shape[0]
        lo, hi = min(x.shape[0], rank * chunk), min(x.shape[0], (rank + 1) * chunk)
        return x[lo:hi].clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        padded = grad.new_zeros(ctx.chunk, *grad.shape[1:])
        padded[: grad.shape[0]] = grad
        full = _gather(ctx.runner, "gradient gather", padded, ctx.world)[: ctx.rows]
        return full, None, None, None, None


class _FromSlices(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, mine: torch.Tensor, rank: int, world: int, rows: int, runner: Runner) -> torch.Tensor:
        ctx.rank, ctx.chunk = rank, mine.shape[0]
        return _gather(runner, "gather", mine, world)[:rows]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        mine = grad.new_zeros(ctx.chunk, *grad.shape[1:])
        part = grad[ctx.rank * ctx.chunk : (ctx.rank + 1) * ctx.chunk]
        mine[: part.shape[0]] = part
        return mine, None, None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, recvs: list[int], sends: list[int], what: str, runner: Runner
    ) -> torch.Tensor:
        ctx.recvs, ctx.sends, ctx.what, ctx.runner = recvs, sends, what, runner
        out = x.new_empty(sum(recvs), *x.shape[1:])
        runner(what, lambda: dist.all_to_all_single(out, x.contiguous(), recvs, sends))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        back = grad.new_empty(sum(ctx.sends), *grad.shape[1:])
        ctx.runner(
            f"gradient of the {ctx.what}", lambda: dist.all_to_all_single(back, grad.contiguous(), ctx.sends, ctx.recvs)
        )
        return back, None, None, None, None


def to_slice(x: torch.Tensor, rank: int, world: int, chunk: int, runner: Runner) -> torch.Tensor:
    """Rows [rank * chunk, (rank + 1) * chunk) of x (every rank holds the same x)."""
    out: torch.Tensor = _ToSlice.apply(x, rank, world, chunk, runner)
    return out


def from_slices(mine: torch.Tensor, rank: int, world: int, rows: int, runner: Runner) -> torch.Tensor:
    """Every rank's `mine` [chunk, ...] stacked in rank order, the first `rows` rows."""
    out: torch.Tensor = _FromSlices.apply(mine, rank, world, rows, runner)
    return out


def all_to_all(x: torch.Tensor, recvs: list[int], sends: list[int], what: str, runner: Runner) -> torch.Tensor:
    """all_to_all_single: sends[r] rows of x to rank r, recvs[r] rows from it, in rank order."""
    out: torch.Tensor = _AllToAll.apply(x, recvs, sends, what, runner)
    return out
