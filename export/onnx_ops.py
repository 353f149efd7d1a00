"""ONNX side of the custom ops: `onnx.defs` schemas (with shape inference) and the exporter's translations.

`dsv3c::MLAAttention` v1
    inputs  q_nope [B, S, H, nope], q_pe [B, S, H, rope] (rotated), ckv [B, T, r], kpe [B, T, rope]
            (T = past + S: the cache followed by the S new entries), wkv_b [H * (nope + v), r],
            positions int64 [B, S]
    output  [B, S, H * v]
    attrs   num_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank (ints),
            softmax_scale (float), absorbed (int: 0 expands the latent per head, 1 folds wkv_b into q/out)
    rule    past slot j is visible iff j < positions[b, 0]; new token i' is visible to i iff
            positions[b, i'] <= positions[b, i]

`dsv3c::MoE` v1
    inputs  x [N, D], router [E, D], bias [E] (optional: noaux_tc's selection-only correction),
            gate [E, ff, D], up [E, ff, D], down [E, D, ff]
    output  [N, D]: sum over the top-k experts of weight * down(silu(gate x) * up x)
    attrs   top_k, n_group, topk_group, norm_topk_prob (ints), routed_scaling_factor (float),
            scoring_func ("sigmoid" | "softmax"), topk_method ("greedy" | "group_limited_greedy" | "noaux_tc")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
import onnxscript
import torch
from dsv3c.artifact.names import DOMAIN, DOMAIN_VERSION, MLA_OP, MOE_OP
from dsv3c.export import custom_ops  # noqa: F401  (registers torch.ops.dsv3c.*)
from onnx import defs

VERSION = DOMAIN_VERSION
FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]

_Param = defs.OpSchema.FormalParameter
_Attr = defs.OpSchema.Attribute
_Type = defs.OpSchema.AttrType
_OPTIONAL = defs.OpSchema.FormalParameterOption.Optional


def _output_type(ctx: Any, like: int, dims: list[Any]) -> None:
    """Set output 0 to input `like`'s element type with `dims` (ints, symbolic names, or None: unknown)."""
    elem = ctx.get_input_type(like).tensor_type.elem_type
    shape = [d if isinstance(d, int | str) else None for d in dims]
    ctx.set_output_type(0, onnx.helper.make_tensor_type_proto(elem, shape))


def _dims(ctx: Any, index: int) -> list[Any]:
    """Input `index`'s dims as ints / symbolic names / None, or [] when its rank is unknown."""
    t = ctx.get_input_type(index)
    if t is None or not t.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]


def _attr_int(ctx: Any, name: str) -> int | None:
    a = ctx.get_attribute(name)
    return None if a is None else int(a.i)


def _infer_mla(ctx: Any) -> None:
    q = _dims(ctx, 0)
    heads, v = _attr_int(ctx, "num_heads"), _attr_int(ctx, "v_head_dim")
    width = heads * v if heads is not None and v is not None else None
    _output_type(ctx, 0, [q[0], q[1], width] if len(q) == 4 else [None, None, width])


def _infer_moe(ctx: Any) -> None:
    _output_type(ctx, 0, _dims(ctx, 0) or [None, None])


def _mla_schema() -> defs.OpSchema:
    schema = defs.OpSchema(
        MLA_OP,
        DOMAIN,
        VERSION,
        "Multi-head latent attention core over a latent cache (see dsv3c/export/onnx_ops.py).",
        inputs=[
            _Param("q_nope", "T"),
            _Param("q_pe", "T"),
            _Param("ckv", "T"),
            _Param("kpe", "T"),
            _Param("wkv_b", "T"),
            _Param("positions", "I"),
        ],
        outputs=[_Param("output", "T")],
        type_constraints=[("T", FLOAT_TYPES, "float activations and weights"), ("I", ["tensor(int64)"], "positions")],
        attributes=[
            *(
                _Attr(n, _Type.INT)
                for n in ("num_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank", "absorbed")
            ),
            _Attr("softmax_scale", _Type.FLOAT),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_mla)
    return schema


def _moe_schema() -> defs.OpSchema:
    schema = defs.OpSchema(
        MOE_OP,
        DOMAIN,
        VERSION,
        "DeepSeekMoE routed experts: router, group-limited top-k, SwiGLU experts (see dsv3c/export/onnx_ops.py).",
        inputs=[
            _Param("x", "T"),
            _Param("router", "T"),
            _Param("bias", "B", param_option=_OPTIONAL),
            _Param("gate", "T"),
            _Param("up", "T"),
            _Param("down", "T"),
        ],
        outputs=[_Param("output", "T")],
        type_constraints=[("T", FLOAT_TYPES, "float activations and weights"), ("B", FLOAT_TYPES, "bias")],
        attributes=[
            *(_Attr(n, _Type.INT) for n in ("top_k", "n_group", "topk_group", "norm_topk_prob")),
            _Attr("routed_scaling_factor", _Type.FLOAT),
            _Attr("scoring_func", _Type.STRING),
            _Attr("topk_method", _Type.STRING),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_moe)
    return schema


def register_schemas() -> None:
    """Make onnx.checker and onnx.shape_inference know both ops (idempotent)."""
    for make in (_mla_schema, _moe_schema):
        schema = make()
        if not defs.has(schema.name, schema.domain):
            defs.register_schema(schema)


# ---- translations for torch.onnx.export's custom_translation_table -------------------------------------

_opset = onnxscript.values.Opset(DOMAIN, VERSION)


def _translate_mla(
    q_nope: Any,
    q_pe: Any,
    ckv: Any,
    kpe: Any,
    wkv_b: Any,
    positions: Any,
    num_heads: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
    kv_lora_rank: int,
    softmax_scale: float,
    absorbed: bool,
) -> Any:
    return _opset.MLAAttention(
        q_nope,
        q_pe,
        ckv,
        kpe,
        wkv_b,
        positions,
        num_heads=num_heads,
        qk_nope_head_dim=qk_nope_head_dim,
        qk_rope_head_dim=qk_rope_head_dim,
        v_head_dim=v_head_dim,
        kv_lora_rank=kv_lora_rank,
        softmax_scale=float(softmax_scale),
        absorbed=int(absorbed),
    )


def _translate_moe(
    x: Any,
    router: Any,
    bias: Any,
    gate: Any,
    up: Any,
    down: Any,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
    scoring_func: str,
    topk_method: str,
) -> Any:
    return _opset.MoE(
        x,
        router,
        bias,
        gate,
        up,
        down,
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=float(routed_scaling_factor),
        norm_topk_prob=int(norm_topk_prob),
        scoring_func=scoring_func,
        topk_method=topk_method,
    )


def translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    register_schemas()
    return {
        torch.ops.dsv3c.mla_attention.default: _translate_mla,
        torch.ops.dsv3c.moe.default: _translate_moe,
    }
