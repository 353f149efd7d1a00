"""FP8 weights: the linears the policy selects get FLOAT8E4M3FN weights dequantized in the graph.

    W [out, in] float                     ->  W [out, in] fp8 (same name), W_scale_inv [R, C] float32
    Transpose(W) -> MatMul                    DequantizeLinear(W, expand(W_scale_inv), axis=1, block_size=128)
                                              -> Transpose -> MatMul

Block scheme: `W_scale_inv` is DeepSeek's `weight_scale_inv`, one float32 per 128x128 block (edge blocks
partial), stored as is. Opset-21 DequantizeLinear blocks one axis, so the scales are repeated 128 times
along the other axis in the graph: Unsqueeze -> Expand -> Reshape (-> Slice for a partial edge block),
a constant subgraph onnxruntime folds at load; dequantization is bit-exact (fp8 * scale in float32).
Stacked MoE experts [E, out, in] get scales [E, R, C] and their DequantizeLinear feeds the MoE node, where
a lowering can fuse it. Tensor scheme (for comparison): one scale per matrix (per expert), per-tensor
(or per-axis over experts) DequantizeLinear. A graph in bfloat16 gets a Cast after the dequantization.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx_ir as ir
from dsv3c.artifact.export_folder import mark_weight
from dsv3c.models.fp8 import DEFAULT_BLOCK, Block
from dsv3c.passes.builder import Builder, first_user, initializer, static_dims
from dsv3c.passes.fp8_math import WeightQuantizer, WeightScheme
from dsv3c.passes.fp8_source import CheckpointFp8
from dsv3c.passes.linears import Linear, find_linears
from dsv3c.passes.pipeline import DsPass
from dsv3c.passes.policy import Policy

MIN_OPSET = 21  # DequantizeLinear with block_size


def _require_opset(model: ir.Model, what: str) -> None:
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise ir.passes.PreconditionError(
            f"{what} needs ONNX opset >= {MIN_OPSET}, the graph has {opset}; re-export with --opset 21"
        )


class Fp8WeightsPass(DsPass):
    def __init__(
        self,
        policy: Policy,
        scheme: WeightScheme = WeightScheme.BLOCK,
        block: Block = DEFAULT_BLOCK,
        original: CheckpointFp8 | None = None,
    ) -> None:
        super().__init__()
        self.policy, self.scheme, self.block = policy, scheme, block
        self.quantizer = WeightQuantizer(scheme, block, original)

    def requires(self, model: ir.Model) -> None:
        _require_opset(model, "fp8 weights")
        for linear in find_linears(model.graph):
            if linear.weight.dtype is not None and not linear.weight.dtype.is_floating_point():
                raise ir.passes.PreconditionError(f"weight {linear.name} is {linear.weight.dtype}, not a float")
            if linear.weight.dtype == ir.DataType.FLOAT8E4M3FN:
                raise ir.passes.PreconditionError(
                    f"weight {linear.name} is fp8 already; quantize an unquantized export"
                )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_weight: dict[str, list[Linear]] = {}
        for linear in find_linears(graph):
            by_weight.setdefault(linear.name, []).append(linear)
        quantized, kept = [], []
        for name, linears in by_weight.items():
            if not self.policy.selects(name):
                kept.append(name)
                continue
            self._quantize(graph, linears)
            quantized.append(name)
        self.changes = {
            "fp8_weights": len(quantized),
            "scheme": self.scheme.value,
            "quantized": quantized,
            "high_precision": kept,
        }
        return ir.passes.PassResult(model, bool(quantized))

    def _quantize(self, graph: ir.Graph, linears: Sequence[Linear]) -> None:
        old = linears[0].weight
        name, source, dtype = linears[0].name, old.const_value, old.dtype
        assert source is not None and dtype is not None
        users = [use.node for use in old.uses()]
        graph.initializers.pop(name)
        fp8, scales = self.quantizer.lazy(name, source)
        w = mark_weight(initializer(graph, name, fp8))
        s = mark_weight(initializer(graph, str(scales.name), scales))
        b = Builder(name.removesuffix(".weight"))
        dequantized = self._dequantize(b, w, s, static_dims(fp8.shape))
        if dtype != ir.DataType.FLOAT:
            dequantized = b.op("Cast", dequantized, name="cast", to=dtype)
        b.insert_before(graph, first_user(graph, users))
        for user in users:
            for i, value in enumerate(user.inputs):
                if value is old:
                    user.replace_input_with(i, dequantized)

    def _dequantize(self, b: Builder, w: ir.Value, s: ir.Value, shape: tuple[int, ...]) -> ir.Value:
        """DequantizeLinear of `w` [(E,) out, in] with its scales expanded to what the op takes."""
        if self.scheme == WeightScheme.TENSOR:
            axis: dict[str, Any] = {"axis": 0} if len(shape) == 3 else {}  # one scale per expert, or per tensor
            out: ir.Value = b.op("DequantizeLinear", w, s, name="dequantize", **axis)
            return out
        *lead, n_out, _ = shape
        rows = -(-n_out // self.block[0])
        r = len(lead)  # 0 or 1 (experts)
        expanded = b.op("Unsqueeze", s, b.ints(r + 1, name="axes"), name="scale_unsqueeze")  # [(E,) R, 1, C]
        tile = [1] * (r + 1) + [self.block[0], 1]
        expanded = b.op("Expand", expanded, b.ints(*tile, name="tile"), name="scale_expand")  # [(E,) R, 128, C]
        flat = [0] * r + [rows * self.block[0], -1]
        expanded = b.op("Reshape", expanded, b.ints(*flat, name="rows"), name="scale_rows")  # [(E,) R*128, C]
        if rows * self.block[0] != n_out:  # a partial edge block: crop the repeated rows
            start, end, axes = b.ints(0, name="start"), b.ints(n_out, name="end"), b.ints(r, name="axes")
            expanded = b.op("Slice", expanded, start, end, axes, name="scale_crop")  # [(E,) out, C]
        dq: ir.Value = b.op("DequantizeLinear", w, expanded, name="dequantize", axis=-1, block_size=self.block[1])
        return dq
