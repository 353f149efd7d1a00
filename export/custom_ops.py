"""The two custom ops of the canonical graph, as `torch.library` ops that run the model's own code.

`dsv3c::mla_attention` is the MLA attention *core*: the projections, norms and RoPE stay outside as
ordinary ops, so later passes see every linear layer as a MatMul. `dsv3c::moe` is the routed experts:
router, group-limited top-k and the expert SwiGLUs; the shared experts stay outside as a plain MLP.

The real implementations call `dsv3c.models.deepseek_v3` (`mla_naive` / `mla_absorbed`, `route`), so
the export and the reference model cannot drift apart; the fake implementations give shapes for tracing
(also on the `meta` device, where no weight exists).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from dsv3c.models.deepseek_v3 import Router, mla_absorbed, mla_naive, route


def visibility_mask(positions: torch.Tensor, total: int) -> torch.Tensor:
    """The model's `attention_layout` rule from positions alone: [B, S] -> mask [B, S, T] (True: visible).

    The T keys are P = T - S past slots followed by the S new tokens. Past slot j is visible iff
    j < positions[b, 0] (row b's cache holds that many valid entries); new token i' is visible to i iff
    positions[b, i'] <= positions[b, i].
    """
    batch, seq = positions.shape
    past = total - seq
    slots = torch.arange(past, device=positions.device)  # [P]
    past_ok = (slots[None, None, :] < positions[:, :1, None]).expand(batch, seq, past)  # [B, S, P]
    new_ok = positions[:, None, :] <= positions[:, :, None]  # [B, S(query), S(key)]
    return torch.cat([past_ok, new_ok], dim=-1)  # [B, S, T]


@torch.library.custom_op("dsv3c::mla_attention", mutates_args=())
def mla_attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    wkv_b: torch.Tensor,
    positions: torch.Tensor,
    num_heads: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
    kv_lora_rank: int,
    softmax_scale: float,
    absorbed: bool,
) -> torch.Tensor:
    """q_nope [B, S, H, nope], q_pe [B, S, H, rope] (rotated), ckv [B, T, r], kpe [B, T, rope] -> [B, S, H*v]."""
    mask = visibility_mask(positions, ckv.shape[1])
    attend = mla_absorbed if absorbed else mla_naive
    out = attend(q_nope, q_pe, ckv, kpe, wkv_b, mask, softmax_scale)  # [B, S, H, v]
    return out.flatten(-2).contiguous()  # [B, S, H * v]


@mla_attention.register_fake
def _mla_attention_fake(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    wkv_b: torch.Tensor,
    positions: torch.Tensor,
    num_heads: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
    kv_lora_rank: int,
    softmax_scale: float,
    absorbed: bool,
) -> torch.Tensor:
    batch, seq = q_nope.shape[0], q_nope.shape[1]
    return q_nope.new_empty(batch, seq, num_heads * v_head_dim)


@dataclass(frozen=True)
class Routing:
    """The attributes `route` reads from a Router, without its weights."""

    top_k: int
    n_group: int
    topk_group: int
    scaling: float
    norm_topk_prob: bool
    scoring_func: str
    topk_method: str


def route_tokens(
    x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None, r: Routing
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] -> (weights [N, k] float32, indices [N, k]), exactly as the model's Router."""
    logits = F.linear(x.float(), router.float())  # [N, E]
    scores = logits.sigmoid() if r.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    return route(scores, bias, cast(Router, r))


@torch.library.custom_op("dsv3c::moe", mutates_args=())
def moe(
    x: torch.Tensor,
    router: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
    scoring_func: str,
    topk_method: str,
) -> torch.Tensor:
    """x [N, D]; router [E, D]; gate, up [E, ff, D]; down [E, D, ff] -> routed experts' sum [N, D]."""
    r = Routing(top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob, scoring_func, topk_method)
    weights, indices = route_tokens(x, router, bias, r)  # [N, k]
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in indices.unique().tolist():
        token, slot = (indices == e).nonzero(as_tuple=True)
        h = x[token]
        expert_out = F.linear(F.silu(F.linear(h, gate[e])) * F.linear(h, up[e]), down[e]).float()
        out.index_add_(0, token, expert_out * weights[token, slot, None])
    return out.to(x.dtype)


@moe.register_fake
def _moe_fake(
    x: torch.Tensor,
    router: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
    scoring_func: str,
    topk_method: str,
) -> torch.Tensor:
    return torch.empty_like(x)
