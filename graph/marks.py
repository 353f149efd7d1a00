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
from dsv3c.graph.index import GraphIndex, int_attr, output_names

Key = tuple[str, str, tuple[str, ...]]  # (stage, rewrite, origin)


class Marks:
    """The marked nodes of one graph (by index), grouped by their marks."""

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self.of: dict[int, Provenance] = {}
        self.groups: dict[Key, list[int]] = {}
        # node -> the duplicates the cleanup merged into it (`merged` carries no stage: no stage made the node)
        self.merged: dict[int, tuple[str, ...]] = {}
        for j, node in enumerate(index.nodes):
            if not node.metadata_props:
                continue
            marks = read_props(dict(node.metadata_props))
            if marks.rewrite is not None and marks.rewrite.kind == provenance.MERGED:
                self.merged[j] = marks.origin
            if marks.stage is None:
                continue
            self.of[j] = marks
            self.groups.setdefault(self.key(j), []).append(j)

    def __bool__(self) -> bool:
        return bool(self.of)

    def key(self, j: int) -> Key:
        m = self.of[j]
        return (m.stage or "", str(m.rewrite or ""), m.origin)

    def kind(self, j: int) -> str:
        m = self.of.get(j)
        return m.rewrite.kind if m is not None and m.rewrite is not None else ""

    def group(self, j: int) -> list[int]:
        """The nodes made by the rewrite that made node `j` (just `[j]` for an unmarked node)."""
        return self.groups[self.key(j)] if j in self.of else [j]

    def readers_outside(self, group: list[int]) -> list[tuple[int, int]]:
        """(node, input index) of the nodes outside `group` that read what it computes from its inputs. Its
        constants are left out: the cleanup merges equal constants across groups, so others read them too."""
        inside = set(group)
        found = []
        for j in group:
            if self.index.nodes[j].op_type == "Constant":
                continue
            for out in output_names(self.index.nodes[j]):
                found += [(c, k) for c, k in self.index.consumers.get(out, []) if c not in inside]
        return found

    def quantized_around(self, tensor: str, free: Callable[[int], bool]) -> tuple[list[int], provenance.Rewrite] | None:
        """The `free` nodes that a quantizing rewrite made around `tensor` (one of them reads it), and the rewrite."""
        for j, _ in self.index.consumers.get(tensor, []):
            rewrite = self.of[j].rewrite if j in self.of else None
            if rewrite is not None and rewrite.kind == provenance.QUANTIZED:
                return [x for x in self.group(j) if free(x)], rewrite
        return None

    def lowered_label(self, node: ir.Node, group: list[int]) -> str:
        """The label a lowering's marks give the replaced `node` (`lowered(com.microsoft.MoE)`: "lowered (to
        com.microsoft::MoE)"); "" when no node of `group` carries a lowering mark with `node` as its origin."""
        marks = [
            m for j in group if (m := self.of.get(j)) is not None and node.name and node.name in m.origin and m.rewrite
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
