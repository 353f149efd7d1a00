"""DeepSeek-V3 in one readable file: MLA, DeepSeekMoE, dense first layers, MTP, RMSNorm, SwiGLU, YaRN.

Follows DeepSeek's own `inference/model.py` semantics; module names follow the Hugging Face checkpoint
(`model.layers.{i}.self_attn.kv_b_proj`, ...) so that `state_dict()` keys are checkpoint names. The
MTP modules live in `mtp` and are stored as `model.layers.{num_hidden_layers + k}` (see checkpoint.py).

Attention over a cache: a batch row b holds `past_lengths[b]` valid latent entries; new tokens sit at
`positions[b, i]` and see every valid past entry plus the new tokens at positions <= their own. The
model returns only the new latent entries per layer; appending them is the caller's job (as in ONNX).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.rope import apply_rope, attention_factor, cos_sin, inv_frequencies
from torch import nn

AttentionPath = Literal["naive", "absorbed"]


@dataclass
class LayerCache:
    """One layer's latent cache: normalized c_kv [B, P, kv_lora_rank] and rotated k_pe [B, P, rope]."""

    ckv: torch.Tensor
    kpe: torch.Tensor


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, vocab]
    hidden_states: torch.Tensor  # [B, S, hidden], after the final norm (what the LM head and MTP read)
    new_cache: list[LayerCache]  # per layer, the S new entries


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MLA(nn.Module):
    """Multi-head Latent Attention: low-rank q, low-rank kv with one RoPE key shared by all heads."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        c = config
        self.n_heads, self.kv_lora_rank = c.num_attention_heads, c.kv_lora_rank
        self.nope, self.rope, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.softmax_scale = c.softmax_scale
        q_out = c.num_attention_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(
            c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.unflatten(-1, (self.n_heads, self.nope + self.rope))  # [B, S, H, nope + rope]

    def project_latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> LayerCache:
        """The new cache entries: normalized c_kv [B, S, r] and rotated k_pe [B, S, rope]."""
        ckv, kpe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        return LayerCache(self.kv_a_layernorm(ckv), apply_rope(kpe, cos, sin))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past: LayerCache | None,
        path: AttentionPath = "naive",
    ) -> tuple[torch.Tensor, LayerCache]:
        """x [B, S, D]; mask [B, S, P + S] (True: may attend). Returns [B, S, D] and the S new entries."""
        q_nope, q_pe = self.project_q(x).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)  # [B, S, H, rope]
        new = self.project_latent(x, cos, sin)
        ckv, kpe = new.ckv, new.kpe
        if past is not None:
            ckv, kpe = torch.cat([past.ckv, ckv], dim=1), torch.cat([past.kpe, kpe], dim=1)  # [B, T, *]
        attend = mla_absorbed if path == "absorbed" else mla_naive
        out = attend(q_nope, q_pe, ckv, kpe, self.kv_b_proj.weight, mask, self.softmax_scale)  # [B, S, H, v]
        return self.o_proj(out.flatten(-2)), new


def mla_naive(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    wkv_b: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Expand the latent into per-head keys and values, then attend. Returns [B, S, H, v]."""
    n_heads, nope = q_nope.shape[2], q_nope.shape[3]
    kv = F.linear(ckv, wkv_b).unflatten(-1, (n_heads, -1))  # [B, T, H, nope + v]
    k_nope, v = kv.split([nope, kv.shape[-1] - nope], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1)  # [B, S, H, nope + rope]
    k = torch.cat([k_nope, kpe[:, :, None].expand(-1, -1, n_heads, -1)], dim=-1)  # [B, T, H, nope + rope]
    scores = torch.einsum("bshd,bthd->bhst", q, k) * scale
    probs = _masked_softmax(scores, mask)
    return torch.einsum("bhst,bthd->bshd", probs, v)


def mla_absorbed(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    wkv_b: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Fold kv_b_proj into the query and the output: attention runs over the latent cache itself."""
    n_heads, nope = q_nope.shape[2], q_nope.shape[3]
    w = wkv_b.unflatten(0, (n_heads, -1))  # [H, nope + v, r]
    w_k, w_v = w[:, :nope], w[:, nope:]
    q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_k)  # [B, S, H, r]
    scores = torch.einsum("bshc,btc->bhst", q_latent, ckv) + torch.einsum("bshr,btr->bhst", q_pe, kpe)
    probs = _masked_softmax(scores * scale, mask)
    latent_out = torch.einsum("bhst,btc->bshc", probs, ckv)  # [B, S, H, r]
    return torch.einsum("bshc,hdc->bshd", latent_out, w_v)  # [B, S, H, v]


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """scores [B, H, S, T]; mask [B, S, T]. Softmax in float32, as DeepSeek does."""
    probs = scores.float().masked_fill(~mask[:, None], float("-inf")).softmax(dim=-1)
    return probs.to(scores.dtype)


class Router(nn.Module):
    """DeepSeekMoE gate: scores, selection-only bias, group-limited top-k, weights from unbiased scores."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        n = config.n_routed_experts
        assert n is not None and config.num_experts_per_tok is not None
        self.weight = nn.Parameter(torch.empty(n, config.hidden_size))
        self.top_k, self.n_group, self.topk_group = (
            config.num_experts_per_tok,
            config.n_group,
            config.topk_group,
        )
        self.scoring_func, self.topk_method = config.scoring_func, config.topk_method
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(n), requires_grad=False)
        else:
            self.register_parameter("e_score_correction_bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] float32, expert indices [N, k])."""
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        return route(scores, self.e_score_correction_bias, self)


def route(scores: torch.Tensor, bias: torch.Tensor | None, r: Router) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection on (scores + bias) within the best groups; weights are the unbiased scores."""
    choice = scores if bias is None else scores + bias.float()  # [N, E]; the bias only selects
    if r.topk_method != "greedy" and r.n_group > 1:
        grouped = choice.unflatten(-1, (r.n_group, -1))  # [N, G, E/G]
        # noaux_tc ranks groups by their two best biased scores; V2's group_limited_greedy by the best one
        group_scores = grouped.topk(2, dim=-1).values.sum(-1) if bias is not None else grouped.amax(-1)
        keep = group_scores.topk(r.topk_group, dim=-1).indices  # [N, topk_group]
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter(1, keep, False)  # [N, G]
        # DeepSeek masks dropped groups with -inf; transformers uses 0.0 (differs when choice < 0)
        choice = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
    indices = choice.topk(r.top_k, dim=-1).indices  # [N, k]
    weights = scores.gather(1, indices)
    if r.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * r.scaling, indices


class ExpertDispatch(Protocol):
    """Replaces MoE.routed: same inputs, same [N, D] sum (float32, or already cast to the input dtype)."""

    def __call__(self, moe: MoE, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor: ...


class MoE(nn.Module):
    """Shared experts see every token; each token also visits its top-k routed experts."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        n = config.n_routed_experts
        assert n is not None
        self.gate = Router(config)
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(n))
        if config.n_shared_experts:
            shared = config.moe_intermediate_size * config.n_shared_experts
            self.shared_experts: MLP | None = MLP(config.hidden_size, shared)
        else:
            self.shared_experts = None
        # expert parallelism (dsv3c.parallel) sets this: routed experts then run on the ranks that hold them
        self.dispatch: ExpertDispatch | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(0, -2)  # [N, D]
        weights, indices = self.gate(flat)  # [N, k]
        if self.dispatch is None:
            out = self.routed(flat, weights, indices)
        else:
            out = self.dispatch(self, flat, weights, indices)
        routed = out.to(x.dtype).view_as(x)
        return routed if self.shared_experts is None else routed + self.shared_experts(x)

    def routed(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Each token's weighted sum over its top-k experts, added in ascending expert order: [N, D] float32.

        The (token, slot) pairs are sorted by expert once, stably, so each expert sees its tokens in
        ascending order (as a per-expert nonzero would give them) and the layer waits for the device once,
        for the per-expert counts, instead of once per expert: on a GPU those waits dominated a step.
        """
        out = torch.zeros_like(flat, dtype=torch.float32)
        tokens, slots, counts_on_device = sort_by_expert(indices, len(self.experts))
        counts = counts_on_device.tolist()
        start = 0
        for e, n in enumerate(counts):
            if n:
                token, slot = tokens[start : start + n], slots[start : start + n]
                expert_out = self.experts[e](flat[token]).float()
                out.index_add_(0, token, expert_out * weights[token, slot, None])
            start += n
        return out


def sort_by_expert(indices: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs of top-k `indices` [N, k] sorted by expert, stably (each expert's tokens in
    ascending order): (tokens, slots, tokens per expert [experts]), all on the device."""
    k = indices.shape[1]
    flat = indices.flatten()
    order = flat.argsort(stable=True)  # positions token * k + slot, grouped by expert
    return order // k, order % k, torch.bincount(flat, minlength=experts)


class DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV3Config, index: int):
        super().__init__()
        self.self_attn = MLA(config)
        self.mlp: nn.Module = (
            MoE(config) if config.is_moe_layer(index) else MLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past: LayerCache | None,
        path: AttentionPath,
    ) -> tuple[torch.Tensor, LayerCache]:
        attn, new = self.self_attn(self.input_layernorm(x), cos, sin, mask, past, path)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), new


class MTPModule(nn.Module):
    """Multi-Token Prediction depth k: predicts token t+1+k from the depth k-1 state and token t+k."""

    def __init__(self, config: DeepseekV3Config, index: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = DecoderLayer(config, index)
        self.shared_head = nn.ModuleDict(
            {
                "norm": RMSNorm(config.hidden_size, config.rms_norm_eps),
                "head": nn.Linear(config.hidden_size, config.vocab_size, bias=False),
            }
        )

    def forward(
        self,
        next_ids: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past: LayerCache | None,
        path: AttentionPath,
    ) -> tuple[torch.Tensor, torch.Tensor, LayerCache]:
        """next_ids [B, S] (token t+1 at slot t); hidden [B, S, D]. Returns logits, state, new cache."""
        h = self.eh_proj(torch.cat([self.enorm(self.embed_tokens(next_ids)), self.hnorm(hidden)], dim=-1))
        h, new = self.block(h, cos, sin, mask, past, path)
        return self.shared_head["head"](self.shared_head["norm"](h)), h, new


class DeepseekV3Model(nn.Module):
    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.config = config
        self.model = DeepseekV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        n = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(config, n + k) for k in range(config.num_nextn_predict_layers))
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_frequencies(config), persistent=False)
        self.rope_factor = attention_factor(config)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> DeepseekV3ForCausalLM:
        from dsv3c.models.checkpoint import load_model

        return load_model(path, dtype=dtype)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cos_sin(positions, self.inv_freq, self.rope_factor)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        past: list[LayerCache] | None = None,
        past_lengths: torch.Tensor | None = None,
        path: AttentionPath = "naive",
    ) -> ModelOutput:
        """input_ids [B, S]; past: per layer [B, P, *] with `past_lengths` [B] valid entries per row."""
        positions, mask = attention_layout(input_ids, positions, past, past_lengths)
        cos, sin = self.rope(positions)
        x = self.model.embed_tokens(input_ids)
        new_cache = []
        for i, layer in enumerate(self.model.layers):
            x, new = layer(x, cos, sin, mask, None if past is None else past[i], path)
            new_cache.append(new)
        hidden = self.model.norm(x)
        return ModelOutput(self.lm_head(hidden), hidden, new_cache)

    def forward_mtp(
        self,
        next_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor | None = None,
        past: LayerCache | None = None,
        past_lengths: torch.Tensor | None = None,
        depth: int = 0,
        path: AttentionPath = "naive",
    ) -> tuple[torch.Tensor, torch.Tensor, LayerCache]:
        """MTP depth `depth`: logits for token t+2+depth from hidden at t and token t+1+depth."""
        if depth >= len(self.mtp):
            raise ValueError(f"this model has {len(self.mtp)} MTP modules; depth {depth} does not exist")
        positions, mask = attention_layout(next_ids, positions, None if past is None else [past], past_lengths)
        cos, sin = self.rope(positions)
        return self.mtp[depth](next_ids, hidden, cos, sin, mask, past, path)


def attention_layout(
    input_ids: torch.Tensor,
    positions: torch.Tensor | None,
    past: list[LayerCache] | None,
    past_lengths: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, S] and the attention mask [B, S, P + S] for new tokens over a latent cache."""
    batch, seq = input_ids.shape
    device = input_ids.device
    past_len = 0 if past is None else past[0].ckv.shape[1]
    if past_lengths is None:
        past_lengths = torch.full((batch,), past_len, dtype=torch.long, device=device)
    if positions is None:
        positions = past_lengths[:, None] + torch.arange(seq, device=device)  # [B, S]
    slots = torch.arange(past_len, device=device)
    past_ok = (slots[None, :] < past_lengths[:, None])[:, None, :].expand(batch, seq, past_len)  # [B, S, P]
    new_ok = positions[:, None, :] <= positions[:, :, None]  # [B, S(query), S(key)]
    return positions, torch.cat([past_ok, new_ok], dim=-1)
