"""One rank of expert-parallel inference: join the group, load this rank's weights, install the dispatch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3c.parallel import group as groups
from dsv3c.parallel.dispatch import AllToAllDispatch, install
from dsv3c.parallel.group import Device, RankGroup
from dsv3c.parallel.plan import ExpertPlan
from dsv3c.parallel.rank_model import load_rank_model, source_plan


@dataclass
class ExpertParallel:
    group: RankGroup
    plan: ExpertPlan
    model: DeepseekV3ForCausalLM
    dispatch: AllToAllDispatch

    @property
    def is_primary(self) -> bool:
        return self.group.is_primary

    def close(self) -> None:
        """Leave the group at the end of a run that went well (every rank calls it)."""
        groups.leave(barrier=True)

    def summary(self) -> str:
        """One line: this rank's time in the MoE collectives (waits for slower peers included)."""
        s, g = self.dispatch.stats, self.group
        per_call = 1e3 * s.seconds / max(s.moe_calls, 1)
        return (
            f"ep: {g.world} ranks ({g.backend}); rank {g.rank} spent {1e3 * s.seconds:.1f} ms in MoE collectives, "
            f"{per_call:.2f} ms per MoE layer call ({s.moe_calls} calls), {s.bytes_sent / 2**20:.2f} MiB sent"
        )


def open_expert_parallel(
    source: Path,
    ep: int,
    device: Device = "cpu",
    dtype: torch.dtype = torch.float32,
    timeout_s: float = groups.DEFAULT_TIMEOUT_S,
) -> ExpertParallel:
    """This process's rank: its model (replicated weights + its experts) with the all-to-all dispatch installed.

    Launch and partition mismatches are found before any collective (so they cannot hang); after loading,
    the ranks check that they all hold the same plan and model config.
    """
    plan = source_plan(source, ep)
    group = groups.join(ep, device, timeout_s)
    try:
        model = load_rank_model(source, plan, group.rank, dtype).to(group.device)
        config = json.dumps(model.config.to_dict(), sort_keys=True)
        groups.agree(group, "expert plan or model config", json.dumps(plan.to_dict()) + config)
        return ExpertParallel(group, plan, model, install(model, plan, group))
    except BaseException:
        groups.leave()
        raise
