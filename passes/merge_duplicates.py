"""Common subexpression elimination that says what it merged: onnx_ir's pass, then provenance marks.

onnx_ir's CommonSubexpressionEliminationPass removes a node that computes what an earlier node computes
(same op, same inputs, same attributes) and points its readers at the earlier one. It leaves no trace, so
this pass finds, after it ran, which surviving node absorbed each removed duplicate and stamps the
survivor `dsv3c.rewrite = merged`, `dsv3c.origin = <the duplicates' names>` (artifact/provenance.py):
`dsv3c diff` can read the merge instead of inferring it.

The survivor gets no `dsv3c.stage`: that mark names the stage that created a node, and the cleanup did not
create it (it is the node A had; the model's `dsv3c.stages` lists the cse stage that ran). So a reader that
matches nodes by their stage marks sees the survivor as the node it was. A survivor that already carries
marks (of a stage, or of the export) keeps them, so its rewrite's group stays whole, and records what it
absorbed under a key of its own, `dsv3c.merged_from`; one marked `merged` by an earlier cleanup adds the new
duplicates to its origin. A duplicate that had absorbed others passes them on to its survivor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common
from dsv3c.artifact import provenance

MERGED = provenance.Rewrite(provenance.MERGED)

Operands = tuple[ir.OperatorIdentifier, int, tuple[int, ...]]  # op, outputs, input value ids


class MergeDuplicatesPass(ir.passes.InPlacePass):
    """onnx_ir's CSE on the main graph; every node that absorbed duplicates is stamped `merged`."""

    def __init__(self, size_limit: int = 10) -> None:
        super().__init__()
        self.cse = common.CommonSubexpressionEliminationPass(size_limit=size_limit)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        order = list(graph)
        inputs = {node: tuple(node.inputs) for node in order}  # removal detaches a node from its inputs
        result = self.cse(model)
        if result.modified:
            survivors = set(graph)
            for survivor, duplicates in _absorbed(order, inputs, survivors).items():
                _stamp(survivor, duplicates)
        return ir.passes.PassResult(model, bool(result.modified))


def _absorbed(
    order: Sequence[ir.Node], inputs: dict[ir.Node, tuple[ir.Value | None, ...]], survivors: set[ir.Node]
) -> dict[ir.Node, list[ir.Node]]:
    """survivor -> the removed nodes it absorbed, found by replaying the pass's rule over the nodes as they
    were: in graph order, a removed node's inputs (with earlier duplicates' outputs mapped to their
    survivors') equal those of one surviving node of its op and attributes."""
    canonical: dict[int, ir.Value] = {}  # id of a removed duplicate's output -> the survivor's output
    by_operands: dict[Operands, list[ir.Node]] = {}
    absorbed: dict[ir.Node, list[ir.Node]] = {}

    def operands(node: ir.Node) -> Operands:
        ids = tuple(id(canonical.get(id(v), v)) if v is not None else 0 for v in inputs[node])
        return (node.op_identifier(), len(node.outputs), ids)

    for node in order:
        key = operands(node)
        if node in survivors:
            by_operands.setdefault(key, []).append(node)
            continue
        candidates = by_operands.get(key, [])
        if len(candidates) > 1:
            candidates = [c for c in candidates if _attributes(c) == _attributes(node)]
        if len(candidates) != 1:
            continue  # not removed as a duplicate of one node (the pass removes nothing else): no claim
        survivor = candidates[0]
        for old, new in zip(node.outputs, survivor.outputs, strict=True):
            canonical[id(old)] = new
        absorbed.setdefault(survivor, []).append(node)
    return absorbed


def _attributes(node: ir.Node) -> tuple[tuple[str, Any], ...]:
    """A node's attributes as comparable values (tensors by shape, dtype and bytes)."""
    values = []
    for name, attr in node.attributes.items():
        value: Any = attr.value
        if attr.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
            value = tuple(value)
        elif attr.type is ir.AttributeType.TENSOR:
            array = value.numpy()
            value = (array.shape, str(array.dtype), array.tobytes())
        elif attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            value = id(value)  # never merged by the pass
        values.append((name, value))
    return tuple(sorted(values, key=lambda item: item[0]))


def _stamp(survivor: ir.Node, duplicates: list[ir.Node]) -> None:
    names: list[str] = []
    for dup in duplicates:
        names += provenance.origin_names(dup)
        marks = provenance.read(dup)
        if marks.rewrite is not None and marks.rewrite.kind == provenance.MERGED:
            names += marks.origin  # what the duplicate had absorbed in an earlier cleanup
        names += marks.merged_from
    marks = provenance.read(survivor)
    if not marks.stamped:
        provenance.stamp(survivor, rewrite=MERGED, origin=names)
    elif marks.rewrite is not None and marks.rewrite.kind == provenance.MERGED:
        provenance.stamp(survivor, origin=[*marks.origin, *names], overwrite=True)
    else:  # a stage's (or the export's) node: its marks stay as they are, the merge goes under its own key
        merged = provenance.origin_names([*marks.merged_from, *names])
        survivor.metadata_props[provenance.MERGED_FROM] = "\n".join(merged)
