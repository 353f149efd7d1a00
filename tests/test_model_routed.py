"""The routed experts' sum: one sort per layer gives bit for bit what a per-expert search gives."""

from __future__ import annotations

import pytest
import torch
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import MoE


def per_expert_search(moe: MoE, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The plain formulation: find each expert's (token, slot) pairs by searching the routing table."""
    out = torch.zeros_like(flat, dtype=torch.float32)
    for e in indices.unique().tolist():
        token, slot = (indices == e).nonzero(as_tuple=True)
        out.index_add_(0, token, moe.experts[e](flat[token]).float() * weights[token, slot, None])
    return out


@pytest.mark.parametrize("tokens", [1, 5, 97])
def test_sorted_dispatch_equals_the_per_expert_search(tokens: int) -> None:
    config = DeepseekV3Config.from_preset("tiny")
    torch.manual_seed(tokens)
    moe = MoE(config).eval()
    with torch.no_grad():  # the module's parameters start uninitialized
        for p in moe.parameters():
            p.normal_(0.0, 0.08)
    flat = torch.randn(tokens, config.hidden_size)
    with torch.no_grad():
        weights, indices = moe.gate(flat)
        got = moe.routed(flat, weights, indices)
        want = per_expert_search(moe, flat, weights, indices)
    assert torch.equal(got, want)
    assert got.isfinite().all() and got.abs().sum() > 0
