"""IREE lowering: fixed shapes, and blocked Q/DQ rewritten to element-wise math IREE compiles.

IREE 3.13's ONNX importer (measured; docs/toolchain.md): custom domains and local functions are not
supported (inline first), blocked DequantizeLinear fails, and this graph family crashed iree-compile
with dynamic batch/sequence dims while it compiles and runs with fixed ones. So:

- `StaticShapesPass`: every symbolic input/output dim (batch, seq, q, past) becomes a given integer;
  shapes inside the graph are recomputed by the cleanup's shape inference, and constant folding then
  removes the Shape arithmetic;
- `BlockedQdqToMulPass`: DequantizeLinear(x, s, axis, block_size) -> DequantizeLinear(x, 1) * S and
  QuantizeLinear(x, s, axis, block_size) -> QuantizeLinear(x / S, 1) with S the scales repeated over
  each block (broadcast when one block spans the axis, as for the 1x128 activation tiles): the same
  numbers, through the per-tensor Q/DQ IREE compiles (its importer rejects Cast to float8 types).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.export.builder import Builder, static_dims
from dsv3c.passes.stages import DsPass, StageResult

DEFAULT_DIMS = {"batch": 1, "seq": 16, "q": 1, "past": 16}


class StaticShapesPass(DsPass):
    def __init__(self, dims: dict[str, int]) -> None:
        super().__init__()
        self.dims = dims

    def requires(self, model: ir.Model) -> None:
        for value in [*model.graph.inputs, *model.graph.outputs]:
            for d in value.shape.dims if value.shape is not None else ():
                if not isinstance(d, int) and str(d) not in self.dims:
                    raise ir.passes.PreconditionError(
                        f"{value.name} has a dimension '{d}' with no fixed size; give it, e.g. --shape {d}=8"
                    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        fixed = {}
        for value in [*model.graph.inputs, *model.graph.outputs]:
            if value.shape is None:
                continue
            value.shape = ir.Shape([d if isinstance(d, int) else self.dims[str(d)] for d in value.shape.dims])
            fixed[value.name] = list(value.shape.dims)
        for node in model.graph:  # stale symbolic shapes: shape inference recomputes them
            for out in node.outputs:
                if out not in model.graph.outputs:
                    out.shape = None
        return StageResult(model, bool(fixed), {"dims": {k: v for k, v in self.dims.items()}})


def _block_attrs(node: ir.Node) -> tuple[int, int] | None:
    size = node.attributes.get("block_size")
    if size is None or size.as_int() == 0:
        return None
    axis = node.attributes.get("axis")
    return (axis.as_int() if axis is not None else 1), size.as_int()


def _expanded(b: Builder, scale: ir.Value, x_dims: tuple[int, ...], axis: int, block: int) -> ir.Value:
    """`scale` repeated `block` times along `axis` and cropped to x's size there (or as is, if it broadcasts)."""
    s_dims = static_dims(scale.shape)
    if s_dims[axis] == 1 and x_dims[axis] <= block:
        return scale
    rank = len(x_dims)
    s = b.op("Unsqueeze", scale, b.ints(axis + 1, name="axes"), name="scale_unsqueeze")
    tile = [1] * (rank + 1)
    tile[axis + 1] = block
    s = b.op("Expand", s, b.ints(*tile, name="tile"), name="scale_expand")
    merged = list(s_dims)
    merged[axis] = s_dims[axis] * block
    s = b.op("Reshape", s, b.ints(*merged, name="merged"), name="scale_merge")
    if merged[axis] != x_dims[axis]:
        start, end, axes = b.ints(0, name="start"), b.ints(x_dims[axis], name="end"), b.ints(axis, name="axes")
        s = b.op("Slice", s, start, end, axes, name="scale_crop")
    out: ir.Value = s
    return out


class BlockedQdqToMulPass(DsPass):
    def _blocked(self, model: ir.Model) -> list[ir.Node]:
        return [n for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear") and _block_attrs(n)]

    def requires(self, model: ir.Model) -> None:
        for node in self._blocked(model):
            for value in node.inputs[:2]:
                if value is None or value.shape is None or not all(isinstance(d, int) for d in value.shape.dims):
                    raise ir.passes.PreconditionError(f"{node.name}: blocked Q/DQ needs static shapes; fix them first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = self._blocked(model)
        for node in nodes:
            found = _block_attrs(node)
            assert found is not None
            x, scale = node.inputs[0], node.inputs[1]
            assert x is not None and scale is not None
            x_dims = static_dims(x.shape)
            axis = found[0] % len(x_dims)
            ops = "DequantizeLinear + Mul" if node.op_type == "DequantizeLinear" else "Div + QuantizeLinear"
            b = Builder(node.name or node.op_type, rewrite=provenance.lowered(ops), origin=node)
            s = _expanded(b, scale, x_dims, axis, found[1])
            one = b.const(np.float32(1.0), name="one")
            if node.op_type == "DequantizeLinear":
                out = b.op("Mul", b.op("DequantizeLinear", x, one, name="to_float"), s, name="dequantized")
            else:
                to = node.attributes["output_dtype"].as_int() if "output_dtype" in node.attributes else None
                if to is None and len(node.inputs) > 2 and node.inputs[2] is not None:
                    assert node.inputs[2].dtype is not None
                    to = node.inputs[2].dtype
                if to is None:
                    raise ir.passes.PreconditionError(f"{node.name}: QuantizeLinear without an output type")
                scaled = b.op("Div", x, s, name="scaled")
                out = b.op("QuantizeLinear", scaled, one, output_dtype=ir.DataType(to), name="quantized")
            b.insert_before(model.graph, node)
            ir.convenience.replace_nodes_and_values(
                model.graph,
                insertion_point=node,
                old_nodes=[node],
                new_nodes=[],
                old_values=node.outputs,
                new_values=[out],
            )
        return StageResult(model, bool(nodes), {"blocked_qdq_rewritten": len(nodes)})
