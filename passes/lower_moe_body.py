"""Swap the MoE nodes' reference bodies for the form a backend can run (before the bodies are inlined).

The canonical body is already `ExpertSet.TOP` (TopK over the chosen mask: K = min(E, N top_k) experts,
exactly top_k at decode batch 1; the experts no token chose get weight 0). Folders exported with the
NonZero body (`ExpertSet.CHOSEN`, whose output shape depends on the data) get it here: TensorRT maps
NonZero to a plugin and TensorRT-RTX hosts none, so its parser fails on it; IREE 3.13 compiles it but
computes wrong numbers (measured: relative error 1.4 against PyTorch).
"""

from __future__ import annotations

import onnx_ir as ir
from dsv3c.export.functions import ExpertSet, moe_function, moe_variant
from dsv3c.export.onnx_ops import DOMAIN, MOE_OP
from dsv3c.passes.stages import DsPass, StageResult


class MoEBodyPass(DsPass):
    def __init__(self, expert_set: ExpertSet) -> None:
        super().__init__()
        self.expert_set = expert_set

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports[""]
        replaced: set[ir.OperatorIdentifier] = set()
        for node in [n for n in model.graph if n.domain == DOMAIN and n.op_type == MOE_OP]:
            key = node.op_identifier()
            if key in replaced or key not in model.functions:
                continue  # a body shared by several nodes; or none (InlineCustomPass says so)
            variant = moe_variant(ir.serde.serialize_node(node))
            model.functions[key] = ir.serde.deserialize_function(
                moe_function(variant, opset, node.overload, self.expert_set)
            )
            replaced.add(key)
        return StageResult(model, bool(replaced), {"moe_bodies": {self.expert_set.value: len(replaced)}})
