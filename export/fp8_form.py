"""How an FP8 weight appears in a dsv3c graph: one definition for the exporter and the quantize pass.

    W [(E,) out, in] float                 ->  W [(E,) out, in] FLOAT8E4M3FN (same name)
    W -> users                                 W_scale_inv [(E,) R, C] float32 (R, C = ceil(out/bo), ceil(in/bi))
                                               DequantizeLinear(W, expand(W_scale_inv), axis=-1, block_size=bi)
                                               (-> Cast to the graph's dtype) -> users

Block scheme: `W_scale_inv` is DeepSeek's `weight_scale_inv`, one float32 per [bo, bi] block (edge blocks
partial), stored as is. Opset-21 DequantizeLinear blocks one axis, so the scales are repeated bo times along
the other axis in the graph: Unsqueeze -> Expand -> Reshape (-> Slice for a partial edge block), a constant
subgraph onnxruntime folds at load; dequantization is bit-exact (fp8 * scale in float32). Tensor scheme
(block None): one scale per matrix (per expert for stacked experts), per-tensor or per-axis DequantizeLinear.

An FP8 checkpoint exports straight to this form (its bytes and scales unchanged); `dsv3c quantize` writes
the same form for float weights and keeps weights that are in it already.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.artifact.provenance import Rewrite
from dsv3c.export.builder import Builder

FP8 = ir.DataType.FLOAT8E4M3FN
SCALE_SUFFIX = "_scale_inv"  # DeepSeek's name for the block scales (the tensor scheme uses "_scale")
Block = tuple[int, int]


def block_scale_dims(shape: tuple[int, ...], block: Block) -> tuple[int, ...]:
    """[(E,) ceil(out / bo), ceil(in / bi)] for a weight of `shape` [(E,) out, in]."""
    *lead, out, inp = shape
    return (*lead, -(-out // block[0]), -(-inp // block[1]))


def rewrite_of(block: Block | None) -> Rewrite:
    """The provenance mark of a dequantized weight: `quantized(fp8, block 128)`, `... per-tensor)`."""
    if block is None:
        return provenance.quantized("fp8", "per-tensor")
    return provenance.quantized("fp8", f"block {block[0]}" if block[0] == block[1] else f"block {block[0]}x{block[1]}")


def _register(graph: ir.Graph, name: str, tensor: ir.TensorProtocol, shape: tuple[int, ...]) -> ir.Value:
    if name in graph.initializers:
        raise ValueError(f"bug: initializer {name} exists already")
    value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def dequantize_weight(
    graph: ir.Graph,
    name: str,
    fp8: ir.TensorProtocol,
    scales: ir.TensorProtocol,
    block: Block | None,
    *,
    marked: bool = False,
) -> tuple[ir.Value, ir.Value]:
    """Replace the float initializer `name` of `graph` by `fp8` (same name) and `scales`, dequantized in
    front of its users (then cast back to its dtype when that is not float32). Returns (weight, scales).

    `block` None: the tensor scheme (`scales` [] or [E]). `marked`: the new nodes carry the provenance
    marks of a pass (`quantized(fp8, block 128)`, origin the weight); the exporter's stay unmarked.
    """
    old = graph.initializers[name]
    dtype, shape = old.dtype, tuple(int(d) for d in fp8.shape.dims)  # type: ignore[arg-type]
    users = [use.node for use in old.uses()]
    graph.initializers.pop(name)
    w = _register(graph, name, fp8, shape)
    s = _register(graph, str(scales.name), scales, tuple(int(d) for d in scales.shape.dims))  # type: ignore[arg-type]
    b = Builder(name.removesuffix(".weight"), rewrite_of(block) if marked else None, name if marked else ())
    out = _block_dequantize(b, w, s, shape, block) if block is not None else _tensor_dequantize(b, w, s, shape)
    if dtype is not None and dtype != ir.DataType.FLOAT:
        out = b.op("Cast", out, name="cast", to=dtype)
    wanted = set(users)
    first = next(node for node in graph if node in wanted)
    graph.insert_before(first, b.nodes)
    for user in users:
        for i, value in enumerate(user.inputs):
            if value is old:
                user.replace_input_with(i, out)
    return w, s


def _tensor_dequantize(b: Builder, w: ir.Value, s: ir.Value, shape: tuple[int, ...]) -> ir.Value:
    axis: dict[str, Any] = {"axis": 0} if len(shape) == 3 else {}  # one scale per expert, or per tensor
    return b.op("DequantizeLinear", w, s, name="dequantize", **axis)


def _block_dequantize(b: Builder, w: ir.Value, s: ir.Value, shape: tuple[int, ...], block: Block) -> ir.Value:
    """DequantizeLinear of `w` [(E,) out, in] with its block scales expanded to what the op takes."""
    *lead, n_out, _ = shape
    rows = -(-n_out // block[0])
    r = len(lead)  # 0 or 1 (experts)
    expanded = b.op("Unsqueeze", s, b.ints(r + 1, name="axes"), name="scale_unsqueeze")  # [(E,) R, 1, C]
    tile = [1] * (r + 1) + [block[0], 1]
    expanded = b.op("Expand", expanded, b.ints(*tile, name="tile"), name="scale_expand")  # [(E,) R, bo, C]
    flat = [0] * r + [rows * block[0], -1]
    expanded = b.op("Reshape", expanded, b.ints(*flat, name="rows"), name="scale_rows")  # [(E,) R*bo, C]
    if rows * block[0] != n_out:  # a partial edge block: crop the repeated rows
        start, end, axes = b.ints(0, name="start"), b.ints(n_out, name="end"), b.ints(r, name="axes")
        expanded = b.op("Slice", expanded, start, end, axes, name="scale_crop")  # [(E,) out, C]
    return b.op("DequantizeLinear", w, expanded, name="dequantize", axis=-1, block_size=block[1])
