"""Export-only modules: the model's own submodules, rewired so attention and routed experts are custom ops.

The ONNX initializers are named after the checkpoint (`model.layers.{i}.self_attn.kv_b_proj.weight`, ...)
except for two: the routed experts of a MoE layer are stacked into
`model.layers.{i}.mlp.experts.{gate,up,down}_proj.weight` ([E, ff, D], [E, ff, D], [E, D, ff]), and the MTP
modules keep the model's `mtp.{k}.*` names. Every module here also runs eagerly, so it can be checked
against the reference model without ONNX.

Graph signatures (inputs -> outputs); per layer i the cache is `ckv.{i}` [B, *, kv_lora_rank] and
`kpe.{i}` [B, *, qk_rope_head_dim]:
    prefill  input_ids, positions -> logits, hidden, new_ckv.{i}, new_kpe.{i}
    decode   input_ids, positions, past_ckv.{i}, past_kpe.{i} -> same as prefill
    mtp      next_ids, hidden, positions, past_ckv.0, past_kpe.0 -> logits, hidden_out, new_ckv.0, new_kpe.0
    mtp.{d}  the same for MTP module d >= 1, whose `hidden` is module d-1's `hidden_out` (DeepSeek-V3's
             sequential MTP: module d at slot t reads module d-1's state at t and token t+1+d)
"""

from __future__ import annotations

import torch
from dsv3c.export import custom_ops  # noqa: F401  (registers torch.ops.dsv3c.*)
from dsv3c.models.deepseek_v3 import MLA, MLP, DecoderLayer, DeepseekV3ForCausalLM, LayerCache, MoE, MTPModule
from dsv3c.models.rope import apply_rope, cos_sin
from torch import nn

Cache = tuple[torch.Tensor, torch.Tensor]  # (ckv [B, P, r], kpe [B, P, rope])


class _Weight(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


class StackedExperts(nn.Module):
    """The routed experts' SwiGLU weights stacked on a leading expert axis: [E, ff, D], [E, ff, D], [E, D, ff]."""

    def __init__(self, experts: nn.ModuleList):
        super().__init__()
        mlps = [e for e in experts if isinstance(e, MLP)]
        with torch.no_grad():
            self.gate_proj = _Weight(torch.stack([m.gate_proj.weight for m in mlps]))
            self.up_proj = _Weight(torch.stack([m.up_proj.weight for m in mlps]))
            self.down_proj = _Weight(torch.stack([m.down_proj.weight for m in mlps]))


class ExportMoE(nn.Module):
    """Shared experts as a plain MLP; routed experts as one `dsv3c::moe` op over the stacked weights."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.gate = moe.gate
        self.experts = StackedExperts(moe.experts)
        self.shared_experts = moe.shared_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate
        routed = torch.ops.dsv3c.moe(
            x.flatten(0, -2),
            g.weight,
            g.e_score_correction_bias,  # [N, D], [E, D], [E] or None
            self.experts.gate_proj.weight,
            self.experts.up_proj.weight,
            self.experts.down_proj.weight,
            g.top_k,
            g.n_group,
            g.topk_group,
            g.scaling,
            g.norm_topk_prob,
            g.scoring_func,
            g.topk_method,
        ).view_as(x)
        return routed if self.shared_experts is None else routed + self.shared_experts(x)


def attention(
    attn: MLA,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    past: Cache | None,
    absorbed: bool,
) -> tuple[torch.Tensor, LayerCache]:
    """`MLA.forward` with its core as `dsv3c::mla_attention`. x [B, S, D] -> [B, S, D], the S new entries."""
    q_nope, q_pe = attn.project_q(x).split([attn.nope, attn.rope], dim=-1)  # [B, S, H, nope], [B, S, H, rope]
    q_pe = apply_rope(q_pe, cos, sin)
    new = attn.project_latent(x, cos, sin)
    ckv, kpe = new.ckv, new.kpe
    if past is not None:
        ckv, kpe = torch.cat([past[0], ckv], dim=1), torch.cat([past[1], kpe], dim=1)  # [B, T, *]
    out = torch.ops.dsv3c.mla_attention(
        q_nope,
        q_pe,
        ckv,
        kpe,
        attn.kv_b_proj.weight,
        positions,
        attn.n_heads,
        attn.nope,
        attn.rope,
        attn.v_dim,
        attn.kv_lora_rank,
        attn.softmax_scale,
        absorbed,
    )  # [B, S, H * v]
    return attn.o_proj(out), new


class ExportLayer(nn.Module):
    """A decoder layer: (x, cos, sin, positions[, past_ckv, past_kpe]) -> (x, new_ckv, new_kpe)."""

    def __init__(self, layer: DecoderLayer, absorbed: bool):
        super().__init__()
        self.self_attn = layer.self_attn
        self.mlp = ExportMoE(layer.mlp) if isinstance(layer.mlp, MoE) else layer.mlp
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.absorbed = absorbed

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        past_ckv: torch.Tensor | None = None,
        past_kpe: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert isinstance(self.self_attn, MLA)
        past = None if past_ckv is None or past_kpe is None else (past_ckv, past_kpe)
        attn, new = attention(self.self_attn, self.input_layernorm(x), cos, sin, positions, past, self.absorbed)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), new.ckv, new.kpe


class Embed(nn.Module):
    """(input_ids, positions) -> (x [B, S, D], cos, sin [B, S, rope / 2]). Weights: model.embed_tokens, inv_freq."""

    inv_freq: torch.Tensor

    def __init__(self, model: DeepseekV3ForCausalLM):
        super().__init__()
        self.model = nn.ModuleDict({"embed_tokens": model.model.embed_tokens})
        self.register_buffer("inv_freq", model.inv_freq.clone())
        self.rope_factor = model.rope_factor

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cos, sin = cos_sin(positions, self.inv_freq, self.rope_factor)
        return self.model["embed_tokens"](input_ids), cos, sin


class Head(nn.Module):
    """x -> (logits, hidden): the final norm and the LM head. Weights: model.norm, lm_head."""

    def __init__(self, model: DeepseekV3ForCausalLM):
        super().__init__()
        self.model = nn.ModuleDict({"norm": model.model.norm})
        self.lm_head = model.lm_head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model["norm"](x)
        return self.lm_head(hidden), hidden


class CausalLMGraph(nn.Module):
    """Prefill (naive MLA, no past) or decode (absorbed MLA over the latent cache): Embed, layers, Head.

    The ONNX graph is composed from these blocks traced one by one (compose.py); this module runs the
    same wiring eagerly.
    """

    def __init__(self, model: DeepseekV3ForCausalLM, absorbed: bool):
        super().__init__()
        self.embed = Embed(model)
        self.layers = nn.ModuleList(ExportLayer(layer, absorbed) for layer in model.model.layers)  # type: ignore[arg-type]
        self.head = Head(model)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, past: list[Cache] | None = None
    ) -> tuple[torch.Tensor, ...]:
        x, cos, sin = self.embed(input_ids, positions)
        new_entries: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, ckv, kpe = layer(x, cos, sin, positions, *(() if past is None else past[i]))
            new_entries += [ckv, kpe]
        logits, hidden = self.head(x)
        return (logits, hidden, *new_entries)


class ExportMTP(nn.Module):
    def __init__(self, mtp: MTPModule, absorbed: bool):
        super().__init__()
        self.embed_tokens, self.enorm, self.hnorm, self.eh_proj = mtp.embed_tokens, mtp.enorm, mtp.hnorm, mtp.eh_proj
        assert isinstance(mtp.block, DecoderLayer)
        self.block = ExportLayer(mtp.block, absorbed)
        self.shared_head = mtp.shared_head


class MTPGraph(nn.Module):
    """MTP depth `depth` over its own one-layer latent cache (`model.forward_mtp`), traced whole."""

    inv_freq: torch.Tensor

    def __init__(self, model: DeepseekV3ForCausalLM, depth: int = 0, absorbed: bool = True):
        super().__init__()
        module = model.mtp[depth]
        assert isinstance(module, MTPModule)
        self.depth = depth
        self.mtp = nn.ModuleDict({str(depth): ExportMTP(module, absorbed)})  # weights: mtp.{depth}.*
        self.register_buffer("inv_freq", model.inv_freq.clone())
        self.rope_factor = model.rope_factor

    def forward(
        self,
        next_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        past_ckv: torch.Tensor | None = None,
        past_kpe: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        m = self.mtp[str(self.depth)]
        assert isinstance(m, ExportMTP)
        cos, sin = cos_sin(positions, self.inv_freq, self.rope_factor)
        h = m.eh_proj(torch.cat([m.enorm(m.embed_tokens(next_ids)), m.hnorm(hidden)], dim=-1))  # [B, S, D]
        h, ckv, kpe = m.block(h, cos, sin, positions, past_ckv, past_kpe)
        logits = m.shared_head["head"](m.shared_head["norm"](h))
        return logits, h, ckv, kpe
