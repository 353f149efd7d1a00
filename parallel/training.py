"""Expert-parallel training pieces: shard a model built whole on every rank, and gather it back to save.

Training builds the same model on every rank (same seed), so each rank drops the experts it does not
own and routes its MoE layers through the all-to-all dispatch, whose collectives carry gradients too
(collectives.py). The replicated parameters receive the same gradients on every rank and stay equal under
the same optimizer; an expert's parameters live, and are updated, on their owner alone. To save, rank 0
receives the other ranks' experts (point to point, one tensor at a time) and holds the whole state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM, MoE
from dsv3c.parallel.dispatch import AllToAllDispatch, install
from dsv3c.parallel.group import RankFailure, RankGroup, first_line
from dsv3c.parallel.plan import ExpertPlan, routed_expert
from dsv3c.parallel.rank_model import RemoteExpert


def shard(model: DeepseekV3ForCausalLM, plan: ExpertPlan, group: RankGroup) -> AllToAllDispatch:
    """Keep only this rank's routed experts (others become RemoteExpert) and install the dispatch."""
    owners = plan.owners()
    for module in model.modules():
        if isinstance(module, MoE):
            for e, owner in enumerate(owners):
                if owner != group.rank:
                    module.experts[e] = RemoteExpert(e, owner)
    return install(model, plan, group)


def gather_state(
    model: DeepseekV3ForCausalLM, plan: ExpertPlan, group: RankGroup, full: dict[str, torch.Size]
) -> dict[str, torch.Tensor] | None:
    """On rank 0: the whole state_dict (others' experts received from their owners); None elsewhere.

    `full` names every tensor of the unsharded model with its shape (e.g. from a meta copy).
    """
    local = model.state_dict()
    owners = plan.owners()
    out: dict[str, torch.Tensor] | None = dict(local) if group.is_primary else None
    try:
        for name in sorted(full):
            e = routed_expert(name)
            if e is None or owners[e] == 0:
                continue
            if group.rank == owners[e]:
                dist.send(local[name].detach().contiguous(), dst=0)
            elif out is not None:
                buffer = torch.empty(full[name], dtype=_dtype_of(local), device=group.device)
                dist.recv(buffer, src=owners[e])
                out[name] = buffer
    except RuntimeError as e:
        raise RankFailure(f"rank {group.rank}: gathering the experts to rank 0 failed ({first_line(e)})") from None
    return out


def _dtype_of(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The experts' dtype: that of any local routed expert weight (every rank holds at least one)."""
    return next(t.dtype for n, t in state.items() if routed_expert(n) is not None)
