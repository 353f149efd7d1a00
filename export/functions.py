"""Reference bodies in standard ONNX for the custom nodes, attached as model-local functions.

torch.onnx always inlines onnxscript functions, so the bodies are built here with `onnx.helper` and added
to the ModelProto after export (the custom node then keeps its body). onnxruntime runs the canonical graph
as it is, while backends with a native kernel (or a TensorRT plugin of the same name) replace the node.

Numeric attributes (softmax_scale, top_k, n_group, topk_group, routed_scaling_factor) are read through
attribute references, and every size comes from input shapes. What changes the *structure* of a body
(naive or absorbed MLA; the scoring function, group-limited selection, bias and normalisation of MoE) is
a `variant`: one function per variant present in a file. A file normally holds one variant per op; when
it holds several, each gets an `overload` (ONNX IR >= 10) named after the variant.
"""

from __future__ import annotations

import enum
from dataclasses import astuple, dataclass
from typing import Any

import onnx
from dsv3c.export.onnx_ops import DOMAIN, MLA_OP, MOE_OP
from onnx import TensorProto, helper

MLA_ATTRS = [
    "num_heads",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "kv_lora_rank",
    "softmax_scale",
    "absorbed",
]
MOE_ATTRS = ["top_k", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "scoring_func", "topk_method"]
_FLOAT = TensorProto.FLOAT
_INT64 = TensorProto.INT64


class Body:
    """Collects nodes of one function body with deterministic value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs: str, n_out: int = 1, out: str | None = None, **attrs: Any) -> Any:
        """Append a node; returns its output name (or names, when n_out > 1). `out` names a single output."""
        outs = [out] if out else [f"{op_type.lower()}_{len(self.nodes)}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def ints(self, *values: int) -> str:
        return self.op("Constant", value=helper.make_tensor("v", _INT64, [len(values)], list(values)))

    def scalar(self, value: float) -> str:
        return self.op("Constant", value=helper.make_tensor("v", _FLOAT, [], [value]))

    def attr(self, name: str, kind: onnx.AttributeProto.AttributeType) -> str:
        """A Constant read from the calling node's attribute `name`: a scalar (float) or a [1] int64."""
        field = "value_float" if kind == onnx.AttributeProto.FLOAT else "value_int"
        out = f"attr_{name}_{len(self.nodes)}"
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(helper.make_attribute_ref(field, kind, ref_attr_name=name))
        self.nodes.append(node)
        return out if kind == onnx.AttributeProto.FLOAT else self.op("Reshape", out, self.ints(1))

    def shape(self, x: str, start: int, end: int) -> str:
        return self.op("Shape", x, start=start, end=end)

    def t(self, x: str, *perm: int) -> str:
        return self.op("Transpose", x, perm=list(perm))


# ---- MLAAttention ------------------------------------------------------------------------------------


def _mla_mask(b: Body, ckv: str, positions: str) -> str:
    """[B, 1, S, T] bool: past slot j visible iff j < positions[b, 0]; new i' iff pos[i'] <= pos[i]."""
    total, seq, batch = b.shape(ckv, 1, 2), b.shape(positions, 1, 2), b.shape(positions, 0, 1)
    return mla_mask_past(b, b.op("Sub", total, seq), seq, batch, positions)


def mla_mask_past(b: Body, past: str, seq: str, batch: str, positions: str) -> str:
    """The same mask from the number of past slots, new tokens and rows ([1] int64 each): [B, 1, S, P + S]."""
    zero, one = b.op("Constant", value_int=0), b.op("Constant", value_int=1)
    slots = b.op("Range", zero, b.op("Squeeze", past, b.ints(0)), one)  # [P]
    first = b.op("Slice", positions, b.ints(0), b.ints(1), b.ints(1))  # [B, 1]
    past_ok = b.op("Less", b.op("Unsqueeze", slots, b.ints(0, 1)), b.op("Unsqueeze", first, b.ints(2)))  # [B, 1, P]
    past_ok = b.op("Expand", past_ok, b.op("Concat", batch, seq, past, axis=0))  # [B, S, P]
    new_ok = b.op("LessOrEqual", b.op("Unsqueeze", positions, b.ints(1)), b.op("Unsqueeze", positions, b.ints(2)))
    return b.op("Unsqueeze", b.op("Concat", past_ok, new_ok, axis=2), b.ints(1))  # [B, 1, S, T]


@dataclass(frozen=True)
class MlaPrelude:
    """What every MLA body starts with: kv_b_proj split per head, the queries per head, the scale."""

    rank: str  # [1]: kv_lora_rank, read from the cache's width
    w_k: str  # [H, nope, r]
    w_v: str  # [H, v, r]
    q_nope: str  # [B, H, S, nope]
    q_pe: str  # [B, H, S, rope]
    scale: str  # softmax_scale in the queries' dtype


def mla_prelude(b: Body, ckv: str) -> MlaPrelude:
    """The nodes every MLA body starts with, over the inputs q_nope, q_pe, wkv_b and the cache `ckv`."""
    heads, nope, rank = b.shape("q_nope", 2, 3), b.shape("q_nope", 3, 4), b.shape(ckv, 2, 3)
    w = b.op("Reshape", "wkv_b", b.op("Concat", heads, b.ints(-1), rank, axis=0))  # [H, nope + v, r]
    v_dim = b.op("Sub", b.shape(w, 1, 2), nope)
    w_k, w_v = b.op("Split", w, b.op("Concat", nope, v_dim, axis=0), axis=1, n_out=2)  # [H, nope, r], [H, v, r]
    q_nope, q_pe = b.t("q_nope", 0, 2, 1, 3), b.t("q_pe", 0, 2, 1, 3)  # [B, H, S, nope], [B, H, S, rope]
    scale = b.op("CastLike", b.attr("softmax_scale", onnx.AttributeProto.FLOAT), "q_nope")
    return MlaPrelude(rank, w_k, w_v, q_nope, q_pe, scale)


def absorbed_output(b: Body, latent_rows: str, probs: str, m: MlaPrelude) -> None:
    """The absorbed body's end: latent rows [B, H*S, r] -> `output` [B, S, H * v] through W_uv."""
    latent = b.op("Reshape", latent_rows, b.op("Concat", b.shape(probs, 0, 3), m.rank, axis=0))  # [B, H, S, r]
    mla_output(b, b.op("MatMul", latent, b.t(m.w_v, 0, 2, 1)))  # [B, H, S, r] @ [H, r, v]


def mla_output(b: Body, out: str) -> None:
    """[B, H, S, v] -> the body's `output` [B, S, H * v]."""
    flat = b.op("Concat", b.shape("q_nope", 0, 2), b.ints(-1), axis=0)
    b.op("Reshape", b.t(out, 0, 2, 1, 3), flat, out="output")


def mla_function(absorbed: bool, opset: int, overload: str = "") -> onnx.FunctionProto:
    """Inputs q_nope, q_pe, ckv, kpe, wkv_b, positions -> output [B, S, H * v] (model.mla_naive/absorbed)."""
    b = Body()
    m = mla_prelude(b, "ckv")
    rank, w_k, w_v, q_nope, q_pe, scale = m.rank, m.w_k, m.w_v, m.q_nope, m.q_pe, m.scale
    if absorbed:
        # Heads fold into the GEMM's rows ([B, H*S, r] @ [B, r, T]): one batched GEMM per row of the batch
        # reads the latent cache once. Broadcasting it over a head axis instead ([B, H, S, r] @ [B, 1, r, T])
        # runs H GEMMs that each read the whole cache: at context 16384 on the CPU, decode took 3.3x what its
        # bytes predict.
        q_latent = b.op("MatMul", q_nope, w_k)  # [B, H, S, r]
        q_rows = b.op("Concat", b.shape("q_nope", 0, 1), b.ints(-1), rank, axis=0)  # [B, H*S, r]
        pe_rows = b.op("Concat", b.shape("q_pe", 0, 1), b.ints(-1), b.shape("q_pe", 3, 4), axis=0)
        s_latent = b.op("MatMul", b.op("Reshape", q_latent, q_rows), b.t("ckv", 0, 2, 1))  # [B, H*S, T]
        s_rope = b.op("MatMul", b.op("Reshape", q_pe, pe_rows), b.t("kpe", 0, 2, 1))  # [B, H*S, T]
        head_shape = b.op("Concat", b.shape(q_latent, 0, 3), b.ints(-1), axis=0)
        scores = b.op("Reshape", b.op("Mul", b.op("Add", s_latent, s_rope), scale), head_shape)  # [B, H, S, T]
    else:
        ckv4 = b.op("Unsqueeze", "ckv", b.ints(1))  # [B, 1, T, r]
        k_nope = b.op("MatMul", ckv4, b.t(w_k, 0, 2, 1))  # [B, H, T, nope]
        values = b.op("MatMul", ckv4, b.t(w_v, 0, 2, 1))  # [B, H, T, v]
        k_shape = b.op("Concat", b.shape(k_nope, 0, 3), b.shape("kpe", 2, 3), axis=0)
        k_pe = b.op("Expand", b.op("Unsqueeze", "kpe", b.ints(1)), k_shape)  # [B, H, T, rope]
        k = b.op("Concat", k_nope, k_pe, axis=3)
        q = b.op("Concat", q_nope, q_pe, axis=3)
        scores = b.op("Mul", b.op("MatMul", q, b.t(k, 0, 1, 3, 2)), scale)  # [B, H, S, T]
    masked = b.op("Where", _mla_mask(b, "ckv", "positions"), b.op("Cast", scores, to=_FLOAT), b.scalar(float("-inf")))
    probs = b.op("CastLike", b.op("Softmax", masked, axis=-1), "q_nope")  # [B, H, S, T]
    if absorbed:
        prob_rows = b.op("Concat", b.shape(probs, 0, 1), b.ints(-1), b.shape(probs, 3, 4), axis=0)  # [B, H*S, T]
        latent = b.op("MatMul", b.op("Reshape", probs, prob_rows), "ckv")  # [B, H*S, r]: the cache read once
        absorbed_output(b, latent, probs, m)
    else:
        mla_output(b, b.op("MatMul", probs, values))  # [B, H, S, v]
    return _function(MLA_OP, ["q_nope", "q_pe", "ckv", "kpe", "wkv_b", "positions"], b, MLA_ATTRS, opset, overload)


# ---- MoE ---------------------------------------------------------------------------------------------


class ExpertSet(enum.Enum):
    """How the MoE body finds the experts it gathers."""

    CHOSEN = "chosen"  # NonZero: exactly the U experts some token chose
    TOP = "top"  # TopK over the chosen mask, K = min(E, N top_k) >= U: every backend parses it (canonical)


@dataclass(frozen=True)
class MoEVariant:
    """What shapes the MoE body; derived from a node's attributes and whether it has the bias input."""

    scoring_func: str  # "sigmoid" | "softmax"
    grouped: bool  # group-limited selection (topk_method != greedy and n_group > 1)
    has_bias: bool  # noaux_tc: the bias selects, and groups rank by their two best biased scores
    normalize: bool  # norm_topk_prob: weights divided by their sum over the top-k

    @property
    def name(self) -> str:
        return "_".join(str(int(v)) if isinstance(v, bool) else v for v in astuple(self))


def moe_selection(b: Body, v: MoEVariant) -> tuple[str, str, str]:
    """(scores [N, E] float, the top-k experts [N, k] int64, their mixing weights [N, k] float)."""
    logits = b.op("MatMul", b.op("Cast", "x", to=_FLOAT), b.t(b.op("Cast", "router", to=_FLOAT), 1, 0))  # [N, E]
    scores = b.op("Sigmoid", logits) if v.scoring_func == "sigmoid" else b.op("Softmax", logits, axis=-1)
    choice = b.op("Add", scores, b.op("Cast", "bias", to=_FLOAT)) if v.has_bias else scores
    if v.grouped:
        n_group = b.attr("n_group", onnx.AttributeProto.INT)
        groups = b.op("Reshape", choice, b.op("Concat", b.ints(0), n_group, b.ints(-1), axis=0))  # [N, G, E/G]
        if v.has_bias:
            top2, _ = b.op("TopK", groups, b.ints(2), axis=-1, n_out=2)
            group_scores = b.op("ReduceSum", top2, b.ints(-1), keepdims=0)  # [N, G]
        else:
            group_scores = b.op("ReduceMax", groups, b.ints(-1), keepdims=0)
        _, keep = b.op("TopK", group_scores, b.attr("topk_group", onnx.AttributeProto.INT), axis=-1, n_out=2)
        zeros = b.op("ConstantOfShape", b.op("Shape", group_scores), value=helper.make_tensor("v", _FLOAT, [1], [0.0]))
        ones = b.op("ConstantOfShape", b.op("Shape", keep), value=helper.make_tensor("v", _FLOAT, [1], [1.0]))
        kept = b.op("Cast", b.op("ScatterElements", zeros, keep, ones, axis=1), to=TensorProto.BOOL)  # [N, G]
        masked = b.op("Where", b.op("Unsqueeze", kept, b.ints(2)), groups, b.scalar(float("-inf")))
        choice = b.op("Reshape", masked, b.op("Shape", choice))  # [N, E]
    top, indices = b.op("TopK", choice, b.attr("top_k", onnx.AttributeProto.INT), axis=-1, n_out=2)  # [N, k]
    # the chosen scores: TopK's own values where it ranked the scores themselves (V2's softmax), else gathered
    # (unbiased, from the biased or group-masked choice)
    weights = top if choice == scores else b.op("GatherElements", scores, indices, axis=1)  # [N, k]
    if v.normalize:
        weights = b.op("Div", weights, b.op("ReduceSum", weights, b.ints(-1), keepdims=1))
    weights = b.op("Mul", weights, b.attr("routed_scaling_factor", onnx.AttributeProto.FLOAT))
    return scores, indices, weights


def _scatter(b: Body, like: str, indices: str, updates: str) -> str:
    """[N, E] float: `updates` [N, k] at `indices` [N, k], 0 elsewhere (E from `like`)."""
    zeros = b.op("ConstantOfShape", b.op("Shape", like), value=helper.make_tensor("v", _FLOAT, [1], [0.0]))
    return b.op("ScatterElements", zeros, indices, updates, axis=1)


def moe_routing(b: Body, v: MoEVariant) -> str:
    """The dense routing matrix [N, E] float: scaled weights at the top-k experts, 0 elsewhere."""
    scores, indices, weights = moe_selection(b, v)
    return _scatter(b, scores, indices, weights)


def moe_function(
    v: MoEVariant, opset: int, overload: str = "", expert_set: ExpertSet = ExpertSet.TOP
) -> onnx.FunctionProto:
    """Inputs x, router, bias, gate, up, down -> output [N, D], computing only the experts tokens can use.

    `ExpertSet.TOP` (the canonical body) gathers K = min(E, N top_k) experts, the chosen ones first (the
    others get weight 0): a decode step at batch 1 reads exactly its top-k experts' weights (K = k), a
    batch at most N top_k experts, and a long prefill, where K reaches E, costs what the dense form costs.
    One formula for every N, with no control flow and no data-dependent shape, so that every backend
    that runs standard ONNX runs it; TensorRT's parser cannot take NonZero (it maps it to a plugin, and
    TensorRT-RTX hosts none). `ExpertSet.CHOSEN` gathers exactly the U <= K experts some token chose with
    NonZero (fewer when tokens share experts), for backends that run NonZero correctly (onnxruntime).
    """
    b = Body()
    scores, indices, weights = moe_selection(b, v)
    routing = _scatter(b, scores, indices, weights)  # [N, E]
    ones = b.op("ConstantOfShape", b.op("Shape", indices), value=helper.make_tensor("v", _FLOAT, [1], [1.0]))
    chosen = b.op("ReduceMax", _scatter(b, scores, indices, ones), b.ints(0), keepdims=0)  # [E]: 1 if any token
    if expert_set == ExpertSet.CHOSEN:
        experts = b.op("Reshape", b.op("NonZero", chosen), b.ints(-1))  # [U]
    else:
        pairs = b.op("Mul", b.shape("x", 0, 1), b.attr("top_k", onnx.AttributeProto.INT))  # [1]: N top_k
        _, experts = b.op("TopK", chosen, b.op("Min", b.shape("gate", 0, 1), pairs), axis=0, n_out=2)  # [K]
    w_gate, w_up, w_down = (b.op("Gather", w, experts, axis=0) for w in ("gate", "up", "down"))  # [U, out, in]
    h = b.op("Unsqueeze", b.t("x", 1, 0), b.ints(0))  # [1, D, N]
    g = b.op("MatMul", w_gate, h)  # [U, ff, N]
    u = b.op("MatMul", w_up, h)
    act = b.op("Mul", b.op("Mul", g, b.op("Sigmoid", g)), u)  # silu(g) * u
    out = b.op("Cast", b.op("MatMul", w_down, act), to=_FLOAT)  # [U, D, N]
    mix = b.op("Unsqueeze", b.t(b.op("Gather", routing, experts, axis=1), 1, 0), b.ints(1))  # [U, 1, N]
    total = b.op("ReduceSum", b.op("Mul", out, mix), b.ints(0), keepdims=0)  # [D, N]
    b.op("CastLike", b.t(total, 1, 0), "x", out="output")  # [N, D]
    inputs = ["x", "router", "bias", "gate", "up", "down"]
    return _function(MOE_OP, inputs, b, MOE_ATTRS, opset, overload)


def moe_variant(node: onnx.NodeProto) -> MoEVariant:
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    has_bias = len(node.input) > 2 and node.input[2] != ""
    grouped = _str(a["topk_method"]) != "greedy" and a["n_group"] > 1
    return MoEVariant(_str(a["scoring_func"]), grouped, has_bias, bool(a["norm_topk_prob"]))


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _function(name: str, inputs: list[str], b: Body, attrs: list[str], opset: int, overload: str) -> onnx.FunctionProto:
    return helper.make_function(
        DOMAIN,
        name,
        inputs,
        ["output"],
        b.nodes,
        [helper.make_opsetid("", opset)],
        attributes=attrs,
        overload=overload or None,
    )


# ---- attaching -----------------------------------------------------------------------------------------


def attach_functions(model: onnx.ModelProto) -> None:
    """Add one function per (op, variant) used by the graph's dsv3c nodes; replaces earlier ones."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    keep = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(keep)
    found: dict[tuple[str, str], tuple[Any, list[onnx.NodeProto]]] = {}
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        if node.op_type == MLA_OP:
            absorbed = bool(helper.get_attribute_value(next(a for a in node.attribute if a.name == "absorbed")))
            key = (MLA_OP, "absorbed" if absorbed else "naive")
            found.setdefault(key, (absorbed, []))[1].append(node)
        elif node.op_type == MOE_OP:
            variant = moe_variant(node)
            found.setdefault((MOE_OP, variant.name), (variant, []))[1].append(node)
    for (op, name), (variant, nodes) in sorted(found.items(), key=lambda kv: kv[0]):
        several = sum(1 for o, _ in found if o == op) > 1
        overload = name if several else ""
        for node in nodes:
            node.overload = overload
        make = mla_function if op == MLA_OP else moe_function
        model.functions.append(make(variant, opset, overload))
