"""Grouped-GEMM experts (train/grouped_experts.py) compute what the model's MoE loop computes, forward and
backward, and idle experts get no gradient; on CUDA in bf16 within bf16's rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import MoE
from dsv3c.train.grouped_experts import GroupedMoE, group_experts


def _moe(experts: int = 8, top_k: int = 2) -> MoE:
    d = DeepseekV3Config.from_preset("tiny").to_dict()
    d.update(hidden_size=32, moe_intermediate_size=24, n_routed_experts=experts, num_experts_per_tok=top_k)
    d.update(n_group=1, topk_group=1, n_shared_experts=1)
    config = DeepseekV3Config.from_dict(d)
    torch.manual_seed(0)
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return moe


def _run(moe: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    x = x.clone().requires_grad_()
    y = moe(x)
    y.pow(2).sum().backward()
    grads = {n: p.grad for n, p in moe.named_parameters()}
    return torch.cat([y.flatten(), x.grad.flatten()]), grads


def test_grouped_experts_equal_the_loop_and_leave_idle_experts_without_gradient() -> None:
    loop = _moe(experts=16)
    grouped = copy.deepcopy(loop)
    assert group_experts(grouped) == 1 and isinstance(grouped, GroupedMoE)
    x = torch.randn(2, 3, 32)  # 6 tokens x 2 slots: at most 12 of 16 experts get tokens
    want, want_grads = _run(loop, x)
    got, got_grads = _run(grouped, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    idle = [n for n, g in want_grads.items() if g is None]
    assert idle and all(got_grads[n] is None for n in idle)
    for name, g in want_grads.items():
        if g is not None:
            torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="needs sm90")
def test_grouped_experts_on_cuda_in_bf16() -> None:
    loop = _moe(experts=32, top_k=4).cuda()
    grouped = copy.deepcopy(loop)
    group_experts(grouped)
    x = torch.randn(64, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, _ = _run(loop, x)
        got, _ = _run(grouped, x)
    assert ((got.float() - want.float()).norm() / want.float().norm()) < 2e-2
