"""FP8 weights: the linears the policy selects get FLOAT8E4M3FN weights dequantized in the graph.

The form (fp8 weight, `_scale_inv` block scales, DequantizeLinear in front of the users) is defined once
in export/fp8_form.py; an FP8 checkpoint exports to it directly. Weights found in that form already are
kept exactly as they are (bytes and scales): never dequantized and quantized again, whatever their scales.
Block scheme: DeepSeek's `weight_scale_inv` per 128x128 block; a float weight is quantized with
models/fp8.py, whose grid recognition (recorded per block, see fp8_math.WeightQuantizer) is a fallback
for float exports of FP8 weights. Tensor scheme (for comparison): one scale per matrix (per expert).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from dsv3c.artifact.export_folder import mark_weight
from dsv3c.export.fp8_form import FP8, dequantize_weight
from dsv3c.models.fp8 import DEFAULT_BLOCK, Block
from dsv3c.onnxkit.linears import WeightUse, rewritable_linears
from dsv3c.passes.fp8_math import WeightQuantizer, WeightScheme
from dsv3c.passes.policy import Policy
from dsv3c.passes.stages import DsPass, StageResult

MIN_OPSET = 21  # DequantizeLinear with block_size


def _require_opset(model: ir.Model, what: str) -> None:
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise ir.passes.PreconditionError(
            f"{what} needs ONNX opset >= {MIN_OPSET}, the graph has {opset}; re-export with --opset 21"
        )


class Fp8WeightsPass(DsPass):
    def __init__(self, policy: Policy, scheme: WeightScheme = WeightScheme.BLOCK, block: Block = DEFAULT_BLOCK) -> None:
        super().__init__()
        self.policy, self.scheme, self.block = policy, scheme, block
        self.quantizer = WeightQuantizer(scheme, block)

    def requires(self, model: ir.Model) -> None:
        _require_opset(model, "fp8 weights")
        for linear in rewritable_linears(model.graph):
            if linear.weight.dtype is not None and not linear.weight.dtype.is_floating_point():
                raise ir.passes.PreconditionError(f"weight {linear.name} is {linear.weight.dtype}, not a float")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_weight: dict[str, list[WeightUse]] = {}
        for linear in rewritable_linears(graph):
            by_weight.setdefault(linear.name, []).append(linear)
        quantized, kept, fp8 = [], [], []
        for name, linears in by_weight.items():
            if linears[0].weight.dtype == FP8:
                fp8.append(name)  # FP8 already (an FP8 checkpoint's weights): kept byte for byte
                continue
            if not self.policy.selects(name):
                kept.append(name)
                continue
            self._quantize(graph, linears)
            quantized.append(name)
        return StageResult(
            model,
            bool(quantized),
            {
                "fp8_weights": len(quantized),
                "scheme": self.scheme.value,
                "quantized": quantized,
                "kept_fp8": fp8,
                "high_precision": kept,
            },
        )

    def _quantize(self, graph: ir.Graph, linears: Sequence[WeightUse]) -> None:
        old = linears[0].weight
        name, source = linears[0].name, old.const_value
        assert source is not None
        fp8, scales = self.quantizer.lazy(name, source)
        block = self.block if self.scheme == WeightScheme.BLOCK else None
        w, s = dequantize_weight(graph, name, fp8, scales, block, marked=True)
        mark_weight(w), mark_weight(s)
