"""MoE dispatch and combine over torch.distributed all-to-all: each token visits the ranks of its experts.

Every rank runs attention on the whole batch (replicated), so every rank enters a MoE layer with the same
N tokens. Rank r takes the contiguous slice r of them, and per layer:

1. dispatch: each (token, expert) pair of its slice goes to the expert's rank, with all_to_all_single
   (split sizes: pairs per destination, exchanged first), together with the expert ids;
2. each rank runs its own experts on what it received;
3. combine: the outputs go back the same way; the token's rank weights them and adds them up in
   ascending expert order, in float32, exactly as `MoE.routed` does in one process;
4. gather: all_gather puts the slices back together, so every rank leaves with the whole [N, D] output.

The collectives are autograd functions (collectives.py), so the same dispatch trains: gradients go
back the way the activations came. Activations travel in the compute dtype (bf16 halves the bytes of
fp32); each conversion happens where the single-process code does it, so the result is still that of
one process.

An expert receives its tokens in the single-process order (slices are in rank order, pairs within a
slice in token order), so its inputs, and with them the results, are those of one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM, MoE
from dsv3c.parallel.collectives import all_to_all, from_slices, to_slice
from dsv3c.parallel.group import RankFailure, RankGroup, first_line
from dsv3c.parallel.plan import ExpertPlan


@dataclass
class CollectiveStats:
    """Time spent in this rank's MoE collectives (waiting for peers included) and the bytes it sent to others."""

    seconds: float = 0.0
    calls: int = 0
    bytes_sent: int = 0
    moe_calls: int = 0

    def reset(self) -> None:
        self.seconds, self.calls, self.bytes_sent, self.moe_calls = 0.0, 0, 0, 0


class AllToAllDispatch:
    """`MoE.dispatch` for expert parallelism (see the module docstring); one instance serves every layer."""

    def __init__(self, plan: ExpertPlan, group: RankGroup):
        self.plan, self.group = plan, group
        self.owners = torch.tensor(plan.owners(), dtype=torch.long, device=group.device)  # [E] -> rank
        self.stats = CollectiveStats()
        self.names: dict[int, str] = {}  # id(moe) -> module name, for error messages

    def __call__(self, moe: MoE, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        self.stats.moe_calls += 1
        run = partial(self._run, self.names.get(id(moe), "a MoE layer"))
        world, rank = self.group.world, self.group.rank
        n, k = indices.shape
        chunk = -(-n // world)  # ceil: slice r is tokens [r * chunk, (r + 1) * chunk)
        lo, hi = min(n, rank * chunk), min(n, (rank + 1) * chunk)
        mine_x, mine_w = to_slice(flat, rank, world, chunk, run), to_slice(weights, rank, world, chunk, run)
        expert = indices[lo:hi].flatten()  # [P] pairs, pair p = (token lo + p // k, slot p % k)
        dest = self.owners[expert]  # [P]
        order = torch.argsort(dest * self.plan.n_experts + expert, stable=True)  # by rank, expert, token
        send_counts = torch.bincount(dest, minlength=world)
        recv_counts = torch.empty_like(send_counts)
        run("exchange of split sizes", lambda: dist.all_to_all_single(recv_counts, send_counts))
        sends, recvs = send_counts.tolist(), recv_counts.tolist()

        x_recv = all_to_all(mine_x[order // k], recvs, sends, "dispatch", run)  # token copies by destination
        e_recv = all_to_all(expert[order], recvs, sends, "dispatch of expert ids", run)
        # outputs travel in the compute dtype: MoE.routed casts them to float32 only after the expert, too
        y_recv = torch.zeros_like(x_recv)
        for e in e_recv.unique().tolist():
            mask = e_recv == e
            y_recv[mask] = moe.experts[e](x_recv[mask])
        y_send = all_to_all(y_recv, sends, recvs, "combine", run)
        row = flat.shape[1] * flat.element_size()  # what leaves the rank: copies for other ranks, out and back
        self.stats.bytes_sent += (sum(sends) - sends[rank]) * (row + 8) + (sum(recvs) - recvs[rank]) * row

        pairs = y_send.float()[torch.argsort(order)]  # back to pair order
        weighted = pairs.view(hi - lo, k, flat.shape[1]) * mine_w[:, :, None]  # [n_r, k, D]
        by_expert = indices[lo:hi].argsort(dim=1)  # each token's slots in ascending expert order
        ordered = weighted.gather(1, by_expert[:, :, None].expand_as(weighted))
        mine = torch.zeros(chunk, flat.shape[1], dtype=torch.float32, device=flat.device)
        for s in range(k):
            mine[: hi - lo] += ordered[:, s]
        # the sum is cast to the compute dtype before the gather, as MoE.forward casts it after MoE.routed
        self.stats.bytes_sent += chunk * row * (world - 1)
        return from_slices(mine.to(flat.dtype), rank, world, n, run)

    def _run(self, layer: str, what: str, collective: Callable[[], object]) -> None:
        start = time.perf_counter()
        try:
            collective()
            if self.group.device.type == "cuda":
                torch.cuda.synchronize(self.group.device)  # NCCL returns at launch; time the transfer itself
        except RuntimeError as e:  # DistBackendError, gloo's closed connection or timeout
            raise RankFailure(
                f"rank {self.group.rank}: the MoE {what} in {layer} failed ({first_line(e)}); a peer rank died "
                f"or did not answer within {self.group.timeout_s:.0f} s"
            ) from None
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1


def install_layer(moe: MoE, plan: ExpertPlan, group: RankGroup) -> AllToAllDispatch:
    """Route one MoE layer through an AllToAllDispatch of its own (benchmarks time a layer alone)."""
    dispatch = AllToAllDispatch(plan, group)
    moe.dispatch = dispatch
    return dispatch


def install(model: DeepseekV3ForCausalLM, plan: ExpertPlan, group: RankGroup) -> AllToAllDispatch:
    """Route every MoE layer of `model` (MTP's included) through one AllToAllDispatch."""
    dispatch = AllToAllDispatch(plan, group)
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            module.dispatch = dispatch
            dispatch.names[id(module)] = name
    return dispatch
