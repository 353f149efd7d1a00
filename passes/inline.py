"""Inline the custom nodes' reference bodies (model-local functions) into the graph: standard ONNX only.

Each node is inlined by `onnxkit.inline.inline_call` (names `N/<body node>`, provenance `inlined(...)`).
"""

from __future__ import annotations

import onnx_ir as ir
from dsv3c.artifact.names import DOMAIN
from dsv3c.onnxkit.inline import inline_call
from dsv3c.passes.stages import DsPass, StageResult


class InlineCustomPass(DsPass):
    """Inline every `dsv3c` node whose op is in `ops` (default: all of them)."""

    def __init__(self, ops: frozenset[str] | None = None) -> None:
        super().__init__()
        self.ops = ops

    def _calls(self, model: ir.Model) -> list[ir.Node]:
        return [n for n in model.graph if n.domain == DOMAIN and (self.ops is None or n.op_type in self.ops)]

    def requires(self, model: ir.Model) -> None:
        for node in self._calls(model):
            if node.op_identifier() not in model.functions:
                raise ir.passes.PreconditionError(
                    f"node {node.name} ({DOMAIN}::{node.op_type}) has no reference body in the model; "
                    "was this graph written by 'dsv3c export'?"
                )

    def call(self, model: ir.Model) -> StageResult:
        calls = self._calls(model)
        counts: dict[str, int] = {}
        for node in calls:
            added, _ = inline_call(model.graph, node, model.functions[node.op_identifier()])
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            counts[f"{node.op_type}_body_nodes"] = counts.get(f"{node.op_type}_body_nodes", 0) + len(added)
        used = {n.op_identifier() for n in model.graph}
        for key in [k for k in model.functions if k[0] == DOMAIN and k not in used]:
            del model.functions[key]
        return StageResult(model, bool(calls), {"inlined": counts})
