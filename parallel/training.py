"""Expert-parallel training pieces: shard a model built whole on every rank, and gather it back to save.

Training builds the same model on every rank (same seed), so each rank drops the experts it does not
own and routes its MoE layers through the all-to-all dispatch, whose collectives carry gradients too
(collectives.py). The replicated parameters receive the same gradients on every rank and stay equal under
the same optimizer; an expert's parameters live, and are updated, on their owner alone. To save, rank 0
receives the other ranks' experts (point to point, one tensor at a time) and holds the whole state.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
from dsv3c.models.checkpoint_layout import assign_parameter, copy_source, finish_model
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM, MoE, MTPModule
from dsv3c.parallel.dispatch import AllToAllDispatch, install
from dsv3c.parallel.group import RankFailure, RankGroup, first_line, leave
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


def clip_grad_norm_(model: DeepseekV3ForCausalLM, max_norm: float, group: RankGroup) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole sharded model: the same norm, and clip, on every rank.

    Replicated gradients are equal on every rank and counted once; each expert's counts on its owner, so
    their squares are summed over ranks (all_reduce). A local clip would scale the replicated parameters
    differently on each rank and let them drift apart.
    """
    replicated: list[torch.Tensor] = []
    experts: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (replicated if routed_expert(name) is None else experts).append(p.grad.detach())
    zero = torch.zeros((), dtype=torch.float32, device=group.device)
    rep_sq = sum((g.float().pow(2).sum() for g in replicated), zero)
    expert_sq = sum((g.float().pow(2).sum() for g in experts), zero.clone())
    try:
        dist.all_reduce(expert_sq)
    except RuntimeError as e:
        raise RankFailure(f"rank {group.rank}: the gradient-norm all_reduce failed ({first_line(e)})") from None
    total = (rep_sq + expert_sq).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in replicated + experts:
        g.mul_(scale.to(g.dtype))
    return total


class ExpertParallelTraining:
    """What `train_model` asks of a distributed run (its `parallel` argument), for expert parallelism.

    Every rank builds the same model and reads the same batches; `shard` drops the experts other ranks
    own, `clip_grad_norm_` clips by the whole model's norm, `full_model` gathers the experts to rank 0.
    """

    def __init__(self, group: RankGroup):
        self.group = group
        self.plan: ExpertPlan | None = None
        self.dispatch: AllToAllDispatch | None = None

    @property
    def is_primary(self) -> bool:
        return self.group.is_primary

    def barrier(self) -> None:
        try:
            dist.barrier()
        except RuntimeError as e:
            raise RankFailure(f"rank {self.group.rank}: a peer failed while preparing ({first_line(e)})") from None

    def close(self) -> None:
        """Leave the group at the end of a run that went well (every rank calls it)."""
        leave(barrier=True)

    def shard(self, model: DeepseekV3ForCausalLM) -> None:
        self.plan = ExpertPlan.for_config(model.config, self.group.world)
        self.shapes = {n: t.shape for n, t in model.state_dict().items()}
        self.dispatch = shard(model, self.plan, self.group)

    def clip_grad_norm_(self, model: DeepseekV3ForCausalLM, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(model, max_norm, self.group)

    def full_model(self, model: DeepseekV3ForCausalLM) -> DeepseekV3ForCausalLM | None:
        """On rank 0 the whole trained model (every rank must call this); None elsewhere."""
        if self.plan is None:
            raise RuntimeError("shard() was not called")
        state = gather_state(model, self.plan, self.group, self.shapes)
        if state is None:
            return None
        with torch.device("meta"):
            whole = DeepseekV3ForCausalLM(model.config)
        for name, tensor in state.items():
            if not name.startswith("mtp.") or copy_source(name, model.config) is None:
                assign_parameter(whole, name, tensor.detach())
        for mtp in cast("list[MTPModule]", list(whole.mtp)):  # tied while training, as in one process
            mtp.embed_tokens.weight = whole.model.embed_tokens.weight
            mtp.shared_head["head"].weight = whole.lm_head.weight
        return finish_model(whole)
