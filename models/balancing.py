"""Auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2): nudge each expert's selection bias.

After each step, an expert that received more than the mean number of tokens has its bias lowered by
gamma, one that received fewer has it raised. The bias only changes which experts are *selected*; the
gating weights that mix expert outputs still come from the unbiased scores (see `route`).
"""

from __future__ import annotations

import torch


def update_correction_bias(bias: torch.Tensor, expert_counts: torch.Tensor, gamma: float = 1e-3) -> torch.Tensor:
    """bias [E], expert_counts [E] (tokens routed to each expert this step) -> the updated bias."""
    if bias.shape != expert_counts.shape:
        raise ValueError(f"bias {tuple(bias.shape)} and expert_counts {tuple(expert_counts.shape)} differ")
    counts = expert_counts.to(torch.float32)
    error = counts.mean() - counts  # > 0: under-loaded, so make it more attractive
    return bias + gamma * torch.sign(error).to(bias.dtype)


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Selected expert indices [N, k] -> tokens per expert [E]."""
    return torch.bincount(indices.flatten(), minlength=n_experts)
