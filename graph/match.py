"""Match the nodes of two graphs, in passes from most to least certain, each a dict lookup (near-linear).

1. name: a name that is unique in both graphs;
2. derived: nodes of B whose provenance mark names a node of A as their origin, or (unmarked) named
   `<node of A>/<what>`, came from rewriting that node of A (a lowering inlining a custom node, replacing
   it by a kernel, rewriting a blocked DequantizeLinear, a RoPE pattern): they are set aside for the
   rewrite report, not matched one to one (A's node must be gone from B, or changed op);
3. outputs: a node of B that produces a tensor name produced by an unmatched node of A with the same op
   (or any op, for a custom node of A: a lowering kept its output);
4. neighbours: same op and the same inputs once the producers are matched (first with attributes and
   initializer names, then without, and then only for nodes with inputs), walking B in topological order
   so that chains resolve in one pass;
5. position: what is left, by op and layer, zipped in order where both sides have the same count
   (Constants excepted: two constants are the same only if their values are).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.graph.index import GraphIndex, attribute_key, is_custom, op_label
from dsv3c.graph.marks import Marks

METHODS = ("name", "outputs", "neighbours", "position")


@dataclass
class Matching:
    a_to_b: dict[ir.Node, ir.Node] = field(default_factory=dict)
    b_to_a: dict[ir.Node, ir.Node] = field(default_factory=dict)
    method: dict[ir.Node, str] = field(default_factory=dict)  # by node of A
    derived: dict[ir.Node, list[ir.Node]] = field(default_factory=dict)  # node of A -> B nodes made from it
    derived_b: dict[ir.Node, ir.Node] = field(default_factory=dict)  # and back: B node -> the node of A

    def add(self, a: ir.Node, b: ir.Node, method: str) -> None:
        self.a_to_b[a] = b
        self.b_to_a[b] = a
        self.method[a] = method

    def derive(self, a: ir.Node, b: ir.Node) -> None:
        self.derived.setdefault(a, []).append(b)
        self.derived_b[b] = a

    def counts(self) -> dict[str, int]:
        c = Counter(self.method.values())
        return {m: c[m] for m in METHODS if c[m]}


def attribute_digest(node: ir.Node) -> Hashable:
    """What a node's attributes hold, as one key: equal keys, equal attributes."""
    return tuple(attribute_key(a) for _, a in sorted(node.attributes.items()))


def _unique_names(index: GraphIndex) -> dict[str, ir.Node]:
    count = Counter(n.name for n in index.nodes if n.name)
    return {n.name: n for n in index.nodes if n.name and count[n.name] == 1}


def _by_name(a: GraphIndex, b: GraphIndex, m: Matching) -> None:
    where_b = _unique_names(b)
    for name, node in _unique_names(a).items():
        if name in where_b:
            m.add(node, where_b[name], "name")


def _derived(a: GraphIndex, b: GraphIndex, m: Matching, marks: Marks) -> None:
    # a node that B still has (same name, same op) was kept: `<name>/...` nodes are some pass's helpers
    kept = {x for x, y in m.a_to_b.items() if op_label(x) == op_label(y)}
    rewritten = {n.name: n for n in a.nodes if n.name and n not in kept}
    if not rewritten:
        return
    for node in b.nodes:
        if node in m.b_to_a:
            continue
        mark = marks.of.get(node)
        # a folded constant's origin is what it computes, not a node it stands in for: the diff's folded group
        replaced = mark is not None and (mark.rewrite is None or mark.rewrite.kind != provenance.FOLDED)
        origin = [rewritten[o] for o in mark.origin if o in rewritten] if mark is not None and replaced else []
        if origin:  # the pass said which node it replaced
            m.derive(origin[0], node)
            continue
        name = node.name or ""
        if "/" not in name:
            continue
        cut = len(name)
        while (cut := name.rfind("/", 0, cut)) > 0:  # longest prefix first
            if name[:cut] in rewritten:
                m.derive(rewritten[name[:cut]], node)
                break


def _by_outputs(a: GraphIndex, b: GraphIndex, m: Matching) -> None:
    for node in a.nodes:
        if node in m.a_to_b:
            continue
        for out in node.outputs:
            other = b.made(out.name or "")
            if other is None or other in m.b_to_a or other in m.derived_b:
                continue
            if op_label(other) == op_label(node) or is_custom(node):
                m.add(node, other, "outputs")
                break


def _signature(
    index: GraphIndex, node: ir.Node, partner: Callable[[ir.Node], ir.Node | None], strict: bool
) -> Hashable | None:
    parts: list[Hashable] = [op_label(node), attribute_digest(node) if strict else ""]
    for value in node.inputs:
        producer = index.producer(value)
        if value is None or not value.name:
            parts.append("")
        elif producer is not None:
            other = partner(producer)
            if other is None:
                return None
            parts.append(("n", other, value.index()))
        elif value.name in index.initializers:
            parts.append(("i", value.name if strict else ""))
        else:
            parts.append(("g", value.name))
    return tuple(parts)


def _by_neighbours(a: GraphIndex, b: GraphIndex, m: Matching, strict: bool) -> None:
    candidates: dict[Hashable, list[ir.Node]] = {}
    for node in a.nodes:
        if node not in m.a_to_b and node not in m.derived and (strict or node.inputs):
            sig = _signature(a, node, lambda p: p, strict)
            candidates.setdefault(sig, []).append(node)
    taken: Counter[Hashable] = Counter()
    for node in b.nodes:
        if node in m.b_to_a or node in m.derived_b or not (strict or node.inputs):
            continue
        sig = _signature(b, node, m.b_to_a.get, strict)
        if sig is None or sig not in candidates:
            continue
        queue = candidates[sig]
        while taken[sig] < len(queue) and queue[taken[sig]] in m.a_to_b:
            taken[sig] += 1
        if taken[sig] < len(queue):
            m.add(queue[taken[sig]], node, "neighbours")
            taken[sig] += 1


def _by_position(a: GraphIndex, b: GraphIndex, m: Matching) -> None:
    groups_a: dict[tuple[str, int | None], list[ir.Node]] = {}
    groups_b: dict[tuple[str, int | None], list[ir.Node]] = {}
    for node in a.nodes:
        if node not in m.a_to_b and node not in m.derived and node.op_type != "Constant":
            groups_a.setdefault((op_label(node), a.layer(node)), []).append(node)
    for node in b.nodes:
        if node not in m.b_to_a and node not in m.derived_b and node.op_type != "Constant":
            groups_b.setdefault((op_label(node), b.layer(node)), []).append(node)
    for key, left in groups_a.items():
        right = groups_b.get(key, [])
        if len(left) == len(right):
            for x, y in zip(left, right, strict=True):
                m.add(x, y, "position")


def match_nodes(a: GraphIndex, b: GraphIndex, marks: Marks | None = None) -> Matching:
    """`marks`: B's provenance marks (read from B when not given)."""
    m = Matching()
    _by_name(a, b, m)
    _derived(a, b, m, marks if marks is not None else Marks(b))
    _by_outputs(a, b, m)
    _by_neighbours(a, b, m, strict=True)
    _by_neighbours(a, b, m, strict=False)
    _by_position(a, b, m)
    return m


def match_initializers(a: GraphIndex, b: GraphIndex, m: Matching) -> dict[str, str]:
    """Initializers of A -> B, by name: the same name, then renamed ones read at the same input of matched nodes."""
    pairs = {name: name for name in a.initializers if name in b.initializers}
    taken_b = set(pairs.values())
    for x, y in m.a_to_b.items():
        for u, v in zip(x.inputs, y.inputs, strict=False):
            if a.is_initializer(u) and b.is_initializer(v):
                assert u is not None and v is not None and u.name is not None and v.name is not None
                if u.name not in pairs and v.name not in taken_b:
                    pairs[u.name] = v.name
                    taken_b.add(v.name)
    return pairs


class Unmatched:
    """Why a node found no partner, pass by pass, in words (as onnxscript's rewriter says which condition of a
    rule failed): `why(node)` for a node of `this` that no node of `other` was matched to."""

    def __init__(
        self,
        this: GraphIndex,
        other: GraphIndex,
        partner: dict[ir.Node, ir.Node],
        other_partner: dict[ir.Node, ir.Node],
    ):
        self.this, self.other, self.partner, self.other_partner = this, other, partner, other_partner
        self.names_this = Counter(n.name for n in this.nodes if n.name)
        self.names_other = Counter(n.name for n in other.nodes if n.name)
        self.where_other = {n.name: n for n in other.nodes if n.name}
        self.free_this = Counter((op_label(n), this.layer(n)) for n in this.nodes if n not in partner)
        self.free_other = Counter((op_label(n), other.layer(n)) for n in other.nodes if n not in other_partner)

    def why(self, node: ir.Node) -> str:
        """One reason per matching pass: name, outputs, neighbours, position."""
        this, other = self.this, self.other
        op, reasons = op_label(node), []
        if not node.name:
            reasons.append("it has no name")
        elif self.names_this[node.name] > 1 or self.names_other[node.name] > 1:
            reasons.append(f"its name {node.name!r} is not unique")
        elif node.name in self.where_other:
            reasons.append(f"the other graph's {node.name!r} is a {op_label(self.where_other[node.name])}")
        else:
            reasons.append(f"no node named {node.name!r} in the other graph")
        made = [(v.name, there) for v in node.outputs if (there := other.made(v.name or "")) is not None]
        if not made:
            reasons.append("none of its outputs is computed there")
        else:
            out, there = made[0]
            reasons.append(f"its output {out!r} comes from a {op_label(there)} there")
        for k, value in enumerate(node.inputs):
            producer = this.producer(value) if value is not None and value.name else None
            if producer is not None and producer not in self.partner:
                reasons.append(f"input {k} comes from unmatched {this.label(producer)!r}")
                break
        else:
            reasons.append(f"no {op} there reads the same inputs")
        key = (op, this.layer(node))
        reasons.append(f"{self.free_this[key]} unmatched {op} here vs {self.free_other[key]} there in its layer")
        return "; ".join(reasons)
