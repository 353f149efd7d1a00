"""Fuse the exporter's elementwise RMSNorm (and the residual Add before it) into onnxruntime's fused ops.

The torch exporter writes every RMSNorm (models/deepseek_v3.py) as 7 nodes,

    w * (x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2), [-1]) + eps)))

which onnxruntime's own SimplifiedLayerNormalization fusion does not match (it looks for Div), so a decode
step of the `small` preset launched 33 x 7 kernels for its norms alone. onnxscript's ort_fusions rules match
this form exactly (with the Casts of a bf16/fp16 export, which computes the norm in float32):

- RMSNorm -> SimplifiedLayerNormalization (onnxruntime registers it in the ONNX domain, since version 1),
  stash_type = the float precision the export computed the norm in;
- Add(x, residual) feeding such a norm -> com.microsoft::SkipSimplifiedLayerNormalization, whose fourth
  output is the sum the next residual reads.

Every node a rule makes is marked as lowered to its op, with the nodes it replaced as its origin, and named
`<the node whose output it computes>/<op>` (what `dsv3c diff` groups by on a graph without marks).
"""

from __future__ import annotations

import collections

import onnx_ir as ir
import onnx_ir.passes.common as common
from dsv3c.artifact import provenance
from dsv3c.passes.lower_ort import MS_DOMAIN
from dsv3c.passes.stages import DsPass, StageResult
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.rms_normalization import rms_normalization_rules
from onnxscript.rewriter.ort_fusions.skip_normalization import skip_rms_normalization_ruleset

# in order: the norms first, since the skip rules match the SimplifiedLayerNormalization they make
RULE_SETS = (pattern.RewriteRuleSet(rms_normalization_rules), skip_rms_normalization_ruleset)


def _op(node: ir.Node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain else node.op_type


class _Producers:
    """Who computed each value name, and from which names, before a rewrite (the replaced nodes are gone
    after it, but the fused node keeps the names of the values it replaces)."""

    def __init__(self, graph: ir.Graph):
        self.producer: dict[str, ir.Node] = {}
        self.inputs: dict[ir.Node, list[str]] = {}
        for node in graph:
            self.inputs[node] = [v.name for v in node.inputs if v is not None and v.name]
            for out in node.outputs:
                if out.name:
                    self.producer[out.name] = node

    def replaced(self, new: ir.Node, left: set[ir.Node]) -> list[ir.Node]:
        """The removed nodes between `new`'s inputs and its outputs, first the one that made its output 0."""
        stop = {v.name for v in new.inputs if v is not None}
        todo = [o.name for o in reversed(new.outputs) if o.name]
        found: dict[ir.Node, None] = {}
        while todo:
            node = self.producer.get(todo.pop())
            if node is None or node in left or node in found:
                continue
            found[node] = None
            todo.extend(n for n in self.inputs[node] if n not in stop)
        return list(found)


class OrtFusionsPass(DsPass):
    """RMSNorm -> SimplifiedLayerNormalization, residual Add + it -> SkipSimplifiedLayerNormalization."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        before = _Producers(graph)
        old = set(graph)
        applied = sum(rules.apply_to_model(model) for rules in RULE_SETS)
        left = set(graph)
        made: collections.Counter[str] = collections.Counter()
        for node in graph:
            if node in old:
                continue
            # the rewriter copies the marks of the nodes it replaced; this stage made the node
            for key in provenance.KEYS:
                node.metadata_props.pop(key, None)
            origin = [n for n in before.replaced(node, left) if n in old]
            if origin and origin[0].name:  # named as a lowering of the node whose output it computes
                node.name = f"{origin[0].name}/{node.op_type}"
            provenance.stamp(node, rewrite=provenance.lowered(_op(node).replace("::", ".")), origin=origin)
            made[_op(node)] += 1
        if applied:  # the norms' constants (exponent 2, epsilon) are read by no node now
            common.RemoveUnusedNodesPass()(model)
        if any(n.domain == MS_DOMAIN for n in graph):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return StageResult(model, applied > 0, {"fused": dict(sorted(made.items()))} if made else {})
