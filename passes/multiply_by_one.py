"""`Mul(x, 1)` -> `x`, where the 1 is a constant of one element that broadcasting cannot grow x by.

DeepSeekMoE's routing multiplies the chosen weights by routed_scaling_factor, an attribute of the MoE node
that becomes a Constant when the body is inlined. Models whose factor is 1.0 (V2-Lite) then ran a
multiplication by one per MoE layer in every decode step (a kernel per MoE layer on the GPU). x * 1 is x
exactly in IEEE arithmetic, so the node goes; a factor other than 1 (V3's 2.5) keeps it.
"""

from __future__ import annotations

import onnx_ir as ir
from dsv3c.passes.stages import DsPass, StageResult


def _one(value: ir.Value | None, rank: int) -> bool:
    """A constant 1 with a single element and at most `rank` dims (so that x's shape stays)."""
    if value is None:
        return False
    tensor = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant":
        if "value_float" in producer.attributes:  # a scalar
            return producer.attributes["value_float"].as_float() == 1.0
        if "value" in producer.attributes:
            tensor = producer.attributes["value"].as_tensor()
    if tensor is None or len(tensor.shape) > rank or tensor.size != 1:
        return False  # (a weight is never read here: weightless folders have no bytes)
    array = tensor.numpy()
    return array.size == 1 and array.dtype.kind == "f" and bool(array.reshape(()) == 1)


class MultiplyByOnePass(DsPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        removed = 0
        for node in list(graph):
            if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            out = node.outputs[0]
            for keep, other in ((0, 1), (1, 0)):
                x = node.inputs[keep]
                if x is None or x.shape is None or x.dtype != out.dtype or out in graph.outputs:
                    continue
                if not _one(node.inputs[other], len(x.shape)):
                    continue
                out.replace_all_uses_with(x)
                graph.remove(node, safe=True)
                removed += 1
                break
        return StageResult(model, removed > 0, {"multiplications_by_one": removed})
