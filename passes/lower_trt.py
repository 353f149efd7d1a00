"""TensorRT lowering: opset 23, MLA through the standard `Attention` op, Q/DQ in the form TensorRT parses.

MLAAttention -> Attention (opset 23), which TensorRT's parser recognises; the heads' projections stay
MatMuls around it:

    naive     Q = [q_nope, q_pe]                    K = [ckv W_k^T, k_pe (every head)]   V = ckv W_v^T
    absorbed  Q = [q_nope W_k, q_pe] (latent)       K = [ckv, kpe] (one kv head)          V = K
              and the output keeps its first r columns (= probs @ ckv), then leaves the latent: o W_v^T

TensorRT's Attention wants one head size for Q, K and V (measured with TensorRT-RTX 1.7: "Query, Key,
Value tensors must have the same head dimension"): hence V = K in the absorbed form, and in the naive
form V padded with zero columns to the query/key head size and the output cut back.

with the latent cache's visibility rule as a boolean mask [B, 1, S, T] (past slot j visible iff
j < positions[b, 0]; new token i' visible to i iff positions[b, i'] <= positions[b, i]).

Q/DQ: TensorRT takes constant scales only, and builds no blocked FP8 GEMM (TrtQdqPass says what the
weights become instead); activation scales computed in the graph (DeepSeek's online 1x128 tiles) build
only as TensorRT's dynamic MXFP8 quantization (`--activations mxfp8`, lower_mxfp8.py, for targets of
compute capability 10.0 / 12.x); otherwise they must be static (`dsv3c quantize --calibrate N`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.artifact.export_folder import mark_weight
from dsv3c.errors import UserError
from dsv3c.export.builder import Builder, initializer, static_dims
from dsv3c.export.onnx_ops import DOMAIN, MLA_OP
from dsv3c.passes.mxfp8 import MX_BLOCK, TRT_DEQUANTIZE, TRT_DOMAIN
from dsv3c.passes.stages import DsPass, StageResult
from onnxscript import version_converter

ATTENTION_OPSET = 23
_EXPANSION = ("Slice", "Reshape", "Expand", "Unsqueeze")
_LAYOUT = ("Slice", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Pad")


class UpgradeOpsetPass(DsPass):
    """Convert the graph (and its functions' bodies) to `target` with onnxscript's version converter."""

    def __init__(self, target: int = ATTENTION_OPSET) -> None:
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = model.opset_imports.get("", 0)
        if before >= self.target:
            return ir.passes.PassResult(model, False)
        version_converter.convert_version(model, self.target)
        for function in model.functions.values():
            function.opset_imports[""] = self.target
        return StageResult(model, True, {"opset": [before, self.target]})


def mla_mask(b: Builder, ckv: ir.Value, positions: ir.Value) -> ir.Value:
    """[B, 1, S, T] bool, True where query i may attend to cache slot j (see the module docstring)."""

    def unsqueeze(x: ir.Value, *axes: int) -> ir.Value:
        out: ir.Value = b.op("Unsqueeze", x, b.ints(*axes, name="axes"))
        return out

    total = b.op("Shape", ckv, start=1, end=2, name="total")  # [1]: T
    seq = b.op("Shape", positions, start=1, end=2, name="seq")  # [1]: S
    past = b.op("Squeeze", b.op("Sub", total, seq, name="past"), b.ints(0, name="axes"))  # P
    slots = b.op("Range", b.const(np.int64(0), name="zero"), past, b.const(np.int64(1), name="one"), name="slots")
    first = b.op("Slice", positions, b.ints(0, name="start"), b.ints(1, name="end"), b.ints(1, name="axes"))  # [B, 1]
    past_ok = b.op("Less", unsqueeze(slots, 0, 1), unsqueeze(first, 2), name="past_ok")  # [B, 1, P]
    rows = b.op("Concat", b.op("Shape", positions, start=0, end=1), seq, unsqueeze(past, 0), axis=0)
    past_ok = b.op("Expand", past_ok, rows, name="past_ok_rows")  # [B, S, P]
    new_ok = b.op("LessOrEqual", unsqueeze(positions, 1), unsqueeze(positions, 2), name="new_ok")  # [B, S, S]
    return unsqueeze(b.op("Concat", past_ok, new_ok, axis=2, name="visible"), 1)  # [B, 1, S, T]


def _narrow(b: Builder, x: ir.Value, width: int, name: str) -> ir.Value:
    """x[..., :width]"""
    start, end, axes = b.ints(0, name="start"), b.ints(width, name="end"), b.ints(-1, name="axes")
    out: ir.Value = b.op("Slice", x, start, end, axes, name=name)
    return out


def mla_attention(b: Builder, node: ir.Node) -> ir.Value:
    """The MLA node's computation around one opset-23 Attention; returns [B, S, H * v]."""
    q_nope, q_pe, ckv, kpe, wkv_b, positions = node.inputs
    assert q_nope and q_pe and ckv and kpe and wkv_b and positions
    a = {k: v.value for k, v in node.attributes.items()}
    heads, nope = int(a["num_heads"]), int(a["qk_nope_head_dim"])
    v_dim, rank = int(a["v_head_dim"]), int(a["kv_lora_rank"])
    w = b.op("Reshape", wkv_b, b.ints(heads, nope + v_dim, rank, name="heads"), name="wkv_b")  # [H, nope + v, r]
    w_k, w_v = b.op("Split", w, b.ints(nope, v_dim, name="split"), axis=1, num_outputs=2, name="w_kv")
    qn = b.op("Transpose", q_nope, perm=[0, 2, 1, 3], name="q_nope_heads")  # [B, H, S, nope]
    qp = b.op("Transpose", q_pe, perm=[0, 2, 1, 3], name="q_pe_heads")  # [B, H, S, rope]
    latent = b.op("Unsqueeze", ckv, b.ints(1, name="axes"), name="ckv_heads")  # [B, 1, T, r]
    mask = mla_mask(b, ckv, positions)
    attrs: dict[str, Any] = {"scale": float(a["softmax_scale"])}
    if int(a["absorbed"]):
        q = b.op("Concat", b.op("MatMul", qn, w_k, name="q_latent"), qp, axis=3, name="q")  # [B, H, S, r + rope]
        k = b.op("Unsqueeze", b.op("Concat", ckv, kpe, axis=2), b.ints(1, name="axes"), name="k")  # [B, 1, T, r + rope]
        o = b.op("Attention", q, k, k, mask, name="attention", **attrs)  # V = K: [B, H, S, r + rope]
        o = _narrow(b, o, rank, "out_latent")  # [B, H, S, r]: probs @ K[..., :r] = probs @ ckv
        o = b.op("MatMul", o, b.op("Transpose", w_v, perm=[0, 2, 1]), name="out_heads")  # [B, H, S, v]
    else:
        k_nope = b.op("MatMul", latent, b.op("Transpose", w_k, perm=[0, 2, 1]), name="k_nope")  # [B, H, T, nope]
        values = b.op("MatMul", latent, b.op("Transpose", w_v, perm=[0, 2, 1]), name="v")  # [B, H, T, v]
        k_pe = b.op("Expand", b.op("Unsqueeze", kpe, b.ints(1, name="axes")), b.ints(1, heads, 1, 1, name="heads"))
        k = b.op("Concat", k_nope, k_pe, axis=3, name="k")  # [B, H, T, nope + rope]
        q = b.op("Concat", qn, qp, axis=3, name="q")  # [B, H, S, nope + rope]
        width = nope + int(a["qk_rope_head_dim"])
        if v_dim < width:  # TensorRT wants one head size for Q, K and V: zero columns, cut afterwards
            values = b.op("Pad", values, b.ints(0, 0, 0, 0, 0, 0, 0, width - v_dim, name="pads"), name="v_padded")
        elif v_dim > width:  # zero columns in Q and K leave the scores as they are
            pads = b.ints(0, 0, 0, 0, 0, 0, 0, v_dim - width, name="pads")
            q, k = b.op("Pad", q, pads, name="q_padded"), b.op("Pad", k, pads, name="k_padded")
        o = b.op("Attention", q, k, values, mask, name="attention", **attrs)  # [B, H, S, max(v, nope + rope)]
        o = _narrow(b, o, v_dim, "out_values") if v_dim < width else o  # [B, H, S, v]
    o = b.op("Transpose", o, perm=[0, 2, 1, 3], name="out_tokens")  # [B, S, H, v]
    out: ir.Value = b.op("Reshape", o, b.ints(0, 0, heads * v_dim, name="flat"), name="out")  # [B, S, H * v]
    return out


class MlaToAttentionPass(DsPass):
    """MLAAttention -> Attention; the graph needs opset 23 afterwards (UpgradeOpsetPass, once inlined)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = [n for n in model.graph if n.domain == DOMAIN and n.op_type == MLA_OP]
        for node in nodes:
            b = Builder(node.name or "mla", rewrite=provenance.lowered("Attention"), origin=node)
            out = mla_attention(b, node)
            b.insert_before(model.graph, node)
            ir.convenience.replace_nodes_and_values(
                model.graph,
                insertion_point=node,
                old_nodes=[node],
                new_nodes=[],
                old_values=node.outputs,
                new_values=[out],
            )
        return StageResult(model, bool(nodes), {"mla_to_attention": len(nodes)})


def _constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _expansion_source(value: ir.Value) -> tuple[ir.Value, int] | None:
    """(scale initializer, rows per block) behind an Unsqueeze -> Expand -> Reshape (-> Slice) chain, or None."""
    block = 0
    while not value.is_initializer():
        producer = value.producer()
        if producer is None or producer.op_type not in _EXPANSION or not all(_constant(v) for v in producer.inputs[1:]):
            return None
        if producer.op_type == "Expand":
            tile = ir.convenience.get_const_tensor(producer.inputs[1])  # type: ignore[arg-type]
            block = int(tile.numpy()[-2]) if tile is not None else 0
        value = producer.inputs[0]  # type: ignore[assignment]
    return (value, block) if block else None


def _expanded_scales(source: ir.TensorProtocol, block: int, col_repeat: int, dims: tuple[int, ...]) -> ir.LazyTensor:
    """DeepSeek's scales [(E,) R, C] repeated `block` times over rows and `col_repeat` times over columns,
    cropped to `dims` [(E,) out, in / sub-block, 1]."""

    def compute() -> ir.TensorProtocol:
        s = np.asarray(source.numpy(), dtype=np.float32)
        s = np.repeat(np.repeat(s, block, axis=-2), col_repeat, axis=-1)
        return ir.tensor(np.ascontiguousarray(s[..., : dims[-3], : dims[-2], None]))

    return ir.LazyTensor(compute, ir.DataType.FLOAT, ir.Shape(dims))


class TrtQdqPass(DsPass):
    """Q/DQ as TensorRT builds them: constant scales, no blocked weight DequantizeLinear.

    Measured with TensorRT-RTX 1.7: a blocked weight DequantizeLinear with more than one block along
    the input dim next to a Q/DQ'd activation fails the build (it attempts an FP8 GEMM it has no kernel
    for), while per-tensor DQ followed by a Mul builds. So a blocked weight DQ becomes

        DequantizeLinear(w, 1.0) -> Reshape [(E,) out, in / b, b] -> Mul(scales [(E,) out, in / b, 1])
        -> Reshape [(E,) out, in]

    with b = gcd(128, in) (whole blocks for any width; b = 128 for DeepSeek's sizes) and the scales
    repeated over each block's rows: the same numbers, scales 1/b the size of the weight. Online
    activation scales are refused: TensorRT needs them static (calibrated) or as MXFP8 (lower_mxfp8.py).

    A weight whose MatMul reads an MXFP8 activation is dequantized by TRT_MXFP8DequantizeLinear with
    E8M0 scales of 2^0 instead of DequantizeLinear(w, 1.0): TensorRT-RTX 1.7 pairs the two operands'
    scales and fails a float one against E8M0 ("type mismatch between matmul operand scales", measured);
    2^0 leaves the numbers as they are.
    """

    def requires(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type == "QuantizeLinear" and not _constant(node.inputs[1]):
                raise UserError(
                    "TensorRT needs static activation scales, but this graph computes them online (node "
                    f"{node.name}); lower with '--activations mxfp8' (TensorRT's dynamic MXFP8, compute "
                    "capability 10.0/12.x) or quantize the export with 'dsv3c quantize --calibrate N'"
                )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rewritten = 0
        for node in list(model.graph):
            if node.op_type != "DequantizeLinear" or "block_size" not in node.attributes or _constant(node.inputs[1]):
                continue
            found = _expansion_source(node.inputs[1])  # type: ignore[arg-type]
            if found is None or found[0].const_value is None or found[0].name is None:
                continue
            self._rewrite(model.graph, node, *found)
            rewritten += 1
        return StageResult(model, bool(rewritten), {"blocked_weight_dq_to_mul": rewritten})

    def _rewrite(self, graph: ir.Graph, node: ir.Node, source: ir.Value, rows_per_block: int) -> None:
        w = node.inputs[0]
        assert w is not None and source.const_value is not None and source.name is not None
        *lead, width = static_dims(w.shape)
        size = node.attributes["block_size"].as_int()
        sub = math.gcd(size, width)
        dims = (*lead, width // sub, 1)
        name = source.name.removesuffix("_scale_inv") + f"_scale_inv_trt{sub}"
        tensor = _expanded_scales(source.const_value, rows_per_block, size // sub, dims)
        scales = graph.initializers.get(name) or mark_weight(initializer(graph, name, tensor))
        if _feeds_mxfp8_matmul(node.outputs[0]) and width % MX_BLOCK == 0:
            b = Builder(node.name or "dequantize", rewrite=provenance.lowered(f"{TRT_DEQUANTIZE} + Mul"), origin=node)
            values = b.op(
                TRT_DEQUANTIZE,
                w,
                _unit_e8m0(graph, w, (*lead, width // MX_BLOCK)),
                name="to_float",
                domain=TRT_DOMAIN,
                axis=-1,
                block_size=MX_BLOCK,
                output_dtype=ir.DataType.FLOAT,
            )
            values.dtype, values.shape = ir.DataType.FLOAT, ir.Shape((*lead, width))
        else:
            b = Builder(node.name or "dequantize", rewrite=provenance.lowered("DequantizeLinear + Mul"), origin=node)
            values = b.op("DequantizeLinear", w, b.const(np.float32(1.0), name="one"), name="to_float")
        blocks = b.op("Reshape", values, b.ints(*lead, width // sub, sub, name="blocks"), name="blocks")
        scaled = b.op("Mul", blocks, scales, name="scaled")
        out = b.op("Reshape", scaled, b.ints(*lead, width, name="rows"), name="dequantized")
        b.insert_before(graph, node)
        ir.convenience.replace_nodes_and_values(
            graph, insertion_point=node, old_nodes=[node], new_nodes=[], old_values=node.outputs, new_values=[out]
        )


E8M0_ONE = 127  # E8M0 stores the biased exponent: 127 is 2^0


def _unit_e8m0(graph: ir.Graph, w: ir.Value, dims: tuple[int, ...]) -> ir.Value:
    """Scales of 2^0 for `w` in 1x32 blocks, as TensorRT's parser takes E8M0 constants: uint8 exponents."""
    name = (w.name or "weight") + "_e8m0_one"
    if name in graph.initializers:
        return graph.initializers[name]

    def ones() -> ir.TensorProtocol:
        return ir.tensor(np.full(dims, E8M0_ONE, dtype=np.uint8))

    return mark_weight(initializer(graph, name, ir.LazyTensor(ones, ir.DataType.UINT8, ir.Shape(dims))))


def _feeds_mxfp8_matmul(value: ir.Value) -> bool:
    """Whether `value` reaches (through layout ops) a MatMul whose other operand TensorRT's MXFP8
    dequantization produced (through layout ops)."""

    def from_mxfp8(v: ir.Value | None, depth: int = 0) -> bool:
        p = v.producer() if v is not None else None
        if p is None or depth > 4:
            return False
        return p.op_type == TRT_DEQUANTIZE or (p.op_type in _LAYOUT and from_mxfp8(p.inputs[0], depth + 1))

    pending, seen = [value], 0
    while pending and seen < 16:
        v = pending.pop()
        seen += 1
        for user, index in v.uses():
            if user.op_type == "MatMul":
                if from_mxfp8(user.inputs[1 - index]):
                    return True
            elif user.op_type in _LAYOUT:
                pending.extend(user.outputs)
    return False
