"""Which rank holds which routed experts: the expert-parallel plan, and which tensors each rank needs.

Routed experts are split into contiguous blocks, one per rank (rank r holds experts
[r * E / N, (r + 1) * E / N), the first E % N ranks one more when N does not divide E), the same in every
MoE layer, MTP's included. Everything else (attention, dense MLPs, shared experts, the router, norms,
embeddings, the LM head) is replicated: every rank runs it on the whole batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dsv3c.errors import UserError
from dsv3c.models.config import DeepseekV3Config

# checkpoint names (model.layers.{i}.mlp.experts.{e}.*) and ours (mtp.{k}.block.mlp.experts.{e}.*) alike;
# shared experts are `mlp.shared_experts.*` and do not match
_ROUTED = re.compile(r"(?:^|\.)mlp\.experts\.(\d+)\.")

# how the pieces are joined at run time, recorded in the partition manifest
COLLECTIVES = {
    "dispatch": "torch.distributed.all_to_all_single (split sizes: token copies per destination rank)",
    "combine": "torch.distributed.all_to_all_single (expert outputs back to the token's rank)",
    "gather": "torch.distributed.all_gather (each rank's slice of the MoE output, to every rank)",
    "backend": "nccl on CUDA (one GPU per LOCAL_RANK), gloo on CPU",
}


def routed_expert(name: str) -> int | None:
    """The routed expert a tensor belongs to (checkpoint or model name), None for a replicated tensor."""
    m = _ROUTED.search(name)
    return None if m is None else int(m[1])


@dataclass(frozen=True)
class ExpertPlan:
    """experts[r]: the routed experts rank r holds (the same ids in every MoE layer)."""

    n_experts: int
    experts: tuple[tuple[int, ...], ...]

    @classmethod
    def contiguous(cls, n_experts: int, ranks: int) -> ExpertPlan:
        if ranks < 1:
            raise UserError(f"--ep must be at least 1, got {ranks}")
        if ranks > n_experts:
            raise UserError(f"--ep {ranks}: the model has only {n_experts} routed experts, so at most --ep {n_experts}")
        base, extra = divmod(n_experts, ranks)
        blocks, start = [], 0
        for r in range(ranks):
            size = base + (1 if r < extra else 0)
            blocks.append(tuple(range(start, start + size)))
            start += size
        return cls(n_experts, tuple(blocks))

    @classmethod
    def for_config(cls, config: DeepseekV3Config, ranks: int) -> ExpertPlan:
        if not config.n_routed_experts:
            raise UserError("expert parallelism needs a MoE model; this config has no routed experts")
        return cls.contiguous(config.n_routed_experts, ranks)

    @property
    def ranks(self) -> int:
        return len(self.experts)

    def owners(self) -> list[int]:
        """owners()[e]: the rank holding expert e."""
        out = [0] * self.n_experts
        for r, block in enumerate(self.experts):
            for e in block:
                out[e] = r
        return out

    def holds(self, rank: int, name: str) -> bool:
        """Whether `rank` needs the tensor `name`: a replicated one, or one of its own routed experts."""
        e = routed_expert(name)
        return e is None or e in self.experts[rank]

    def to_dict(self) -> dict[str, Any]:
        return {"n_routed_experts": self.n_experts, "experts_per_rank": [list(b) for b in self.experts]}

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> ExpertPlan:
        try:
            n = int(raw["n_routed_experts"])
            blocks = tuple(tuple(int(e) for e in b) for b in raw["experts_per_rank"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: no valid expert plan (n_routed_experts, experts_per_rank)") from None
        if sorted(e for b in blocks for e in b) != list(range(n)):
            raise UserError(f"{where}: experts_per_rank does not place each of the {n} experts exactly once")
        return cls(n, blocks)
