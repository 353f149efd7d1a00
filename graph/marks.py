"""The provenance marks of a graph's nodes, as the diff reads them: which nodes one rewrite created together.

dsv3c's passes stamp every node they create with its stage, its rewrite and its origin
(artifact/provenance.py). Nodes with the same three marks were made together, by one rewrite of one
thing (a weight, a linear's activation, a custom node): the diff takes such a group whole instead of
inferring it from the graph's shape. A graph without marks (one dsv3c did not write) has no groups, and
the diff falls back to structural inference (graph/rewrites.py).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.artifact.provenance import Provenance, read_props
from dsv3c.graph.index import GraphIndex, int_attr

Key = tuple[str, str, tuple[str, ...]]  # (stage, rewrite, origin)


class Marks:
    """The marked nodes of one graph, grouped by their marks."""

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self.of: dict[ir.Node, Provenance] = {}
        self.groups: dict[Key, list[ir.Node]] = {}
        # node -> the duplicates the cleanup merged into it: the origin of a node marked `merged` (no stage made
        # it), or the `merged_from` of a node that keeps the marks of the stage that made it
        self.merged: dict[ir.Node, tuple[str, ...]] = {}
        for node in index.nodes:
            if not node.metadata_props:
                continue
            marks = read_props(dict(node.metadata_props))
            absorbed = marks.origin if marks.rewrite is not None and marks.rewrite.kind == provenance.MERGED else ()
            if absorbed or marks.merged_from:
                self.merged[node] = (*absorbed, *marks.merged_from)
            if marks.stage is None:
                continue
            self.of[node] = marks
            self.groups.setdefault(self.key(node), []).append(node)

    def __bool__(self) -> bool:
        return bool(self.of)

    def key(self, node: ir.Node) -> Key:
        m = self.of[node]
        return (m.stage or "", str(m.rewrite or ""), m.origin)

    def kind(self, node: ir.Node) -> str:
        m = self.of.get(node)
        return m.rewrite.kind if m is not None and m.rewrite is not None else ""

    def group(self, node: ir.Node) -> list[ir.Node]:
        """The nodes made by the rewrite that made `node` (just `[node]` for an unmarked node)."""
        return self.groups[self.key(node)] if node in self.of else [node]

    def readers_outside(self, group: list[ir.Node]) -> list[tuple[ir.Node, int]]:
        """(node, input index) of the nodes outside `group` that read what it computes from its inputs. Its
        constants are left out: the cleanup merges equal constants across groups, so others read them too."""
        inside = set(group)
        found = []
        for node in group:
            if node.op_type == "Constant":
                continue
            for out in node.outputs:
                found += [(c, k) for c, k in self.index.uses(out) if c not in inside]
        return found

    def quantized_around(
        self, tensor: ir.Value, free: Callable[[ir.Node], bool]
    ) -> tuple[list[ir.Node], provenance.Rewrite] | None:
        """The `free` nodes that a quantizing rewrite made around `tensor` (one of them reads it), and the rewrite."""
        for reader, _ in self.index.uses(tensor):
            rewrite = self.of[reader].rewrite if reader in self.of else None
            if rewrite is not None and rewrite.kind == provenance.QUANTIZED:
                return [x for x in self.group(reader) if free(x)], rewrite
        return None

    def lowered_label(self, node: ir.Node, group: list[ir.Node]) -> str:
        """The label a lowering's marks give the replaced `node` (`lowered(com.microsoft.MoE)`: "lowered (to
        com.microsoft::MoE)"); "" when no node of `group` carries a lowering mark with `node` as its origin."""
        marks = [
            m for x in group if (m := self.of.get(x)) is not None and node.name and node.name in m.origin and m.rewrite
        ]
        rewrite = marks[0].rewrite if marks else None
        if rewrite is None:
            return ""
        if rewrite.kind == provenance.INLINED:
            return f"lowered (inlined, {len(group)} nodes)"
        if rewrite.kind != provenance.LOWERED or len(rewrite.details) != 1:
            return ""
        target = rewrite.details[0]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and int_attr(node, "block_size"):
            return f"lowered (blocked {node.op_type} as {target})"
        domain, _, op = target.rpartition(".")
        return f"lowered (to {domain}::{op})" if domain and " " not in target else f"lowered (to {target})"
