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
from dsv3c.graph.index import GraphIndex, attribute_key, input_names, is_custom, output_names
from dsv3c.graph.marks import Marks

METHODS = ("name", "outputs", "neighbours", "position")


@dataclass
class Matching:
    a_to_b: dict[int, int] = field(default_factory=dict)
    b_to_a: dict[int, int] = field(default_factory=dict)
    method: dict[int, str] = field(default_factory=dict)  # by node index in A
    derived: dict[int, list[int]] = field(default_factory=dict)  # node of A -> B nodes named `<its name>/...`
    derived_b: dict[int, int] = field(default_factory=dict)  # and back: B node -> the node of A

    def add(self, a: int, b: int, method: str) -> None:
        self.a_to_b[a] = b
        self.b_to_a[b] = a
        self.method[a] = method

    def counts(self) -> dict[str, int]:
        c = Counter(self.method.values())
        return {m: c[m] for m in METHODS if c[m]}


def attribute_digest(node: ir.Node) -> Hashable:
    """What a node's attributes hold, as one key: equal keys, equal attributes."""
    return tuple(attribute_key(a) for _, a in sorted(node.attributes.items()))


def _by_name(a: GraphIndex, b: GraphIndex, m: Matching) -> None:
    count_a = Counter(n.name or "" for n in a.nodes)
    count_b = Counter(n.name or "" for n in b.nodes)
    where_b = {n.name: j for j, n in enumerate(b.nodes) if n.name and count_b[n.name] == 1}
    for i, node in enumerate(a.nodes):
        if node.name and count_a[node.name] == 1 and node.name in where_b:
            m.add(i, where_b[node.name], "name")


def _derived(a: GraphIndex, b: GraphIndex, m: Matching, marks: Marks) -> None:
    # a node that B still has (same name, same op) was kept: `<name>/...` nodes are some pass's helpers
    kept = {i for i, j in m.a_to_b.items() if a.op(i) == b.op(j)}
    rewritten = {n.name: i for i, n in enumerate(a.nodes) if n.name and i not in kept}
    if not rewritten:
        return
    for j, node in enumerate(b.nodes):
        if j in m.b_to_a:
            continue
        origin = [rewritten[o] for o in marks.of[j].origin if o in rewritten] if j in marks.of else []
        if origin:  # the pass said which node it replaced
            m.derived.setdefault(origin[0], []).append(j)
            m.derived_b[j] = origin[0]
            continue
        name = node.name or ""
        if "/" not in name:
            continue
        cut = len(name)
        while (cut := name.rfind("/", 0, cut)) > 0:  # longest prefix first
            if name[:cut] in rewritten:
                i = rewritten[name[:cut]]
                m.derived.setdefault(i, []).append(j)
                m.derived_b[j] = i
                break


def _by_outputs(a: GraphIndex, b: GraphIndex, m: Matching) -> None:
    for i, node in enumerate(a.nodes):
        if i in m.a_to_b:
            continue
        for name in output_names(node):
            j = b.producer.get(name, (None, 0))[0] if name else None
            if j is None or j in m.b_to_a or j in m.derived_b:
                continue
            if b.op(j) == a.op(i) or is_custom(node):
                m.add(i, j, "outputs")
                break


def _signature(index: GraphIndex, i: int, partner: Callable[[int], int | None], strict: bool) -> Hashable | None:
    node = index.nodes[i]
    parts: list[Hashable] = [index.op(i), attribute_digest(node) if strict else ""]
    for name in input_names(node):
        if not name:
            parts.append("")
        elif name in index.producer:
            p, k = index.producer[name]
            q = partner(p)
            if q is None:
                return None
            parts.append(("n", q, k))
        elif name in index.initializers:
            parts.append(("i", name if strict else ""))
        else:
            parts.append(("g", name))
    return tuple(parts)


def _by_neighbours(a: GraphIndex, b: GraphIndex, m: Matching, strict: bool) -> None:
    candidates: dict[Hashable, list[int]] = {}
    for i in range(len(a)):
        if i not in m.a_to_b and i not in m.derived and (strict or input_names(a.nodes[i])):
            sig = _signature(a, i, lambda p: p, strict)
            candidates.setdefault(sig, []).append(i)
    taken: Counter[Hashable] = Counter()
    for j in range(len(b)):
        if j in m.b_to_a or j in m.derived_b or not (strict or input_names(b.nodes[j])):
            continue
        sig = _signature(b, j, m.b_to_a.get, strict)
        if sig is None or sig not in candidates:
            continue
        queue = candidates[sig]
        while taken[sig] < len(queue) and queue[taken[sig]] in m.a_to_b:
            taken[sig] += 1
        if taken[sig] < len(queue):
            m.add(queue[taken[sig]], j, "neighbours")
            taken[sig] += 1


def _by_position(a: GraphIndex, b: GraphIndex, m: Matching) -> None:
    groups_a: dict[tuple[str, int | None], list[int]] = {}
    groups_b: dict[tuple[str, int | None], list[int]] = {}
    for i in range(len(a)):
        if i not in m.a_to_b and i not in m.derived and a.op(i) != "Constant":
            groups_a.setdefault((a.op(i), a.layers[i]), []).append(i)
    for j in range(len(b)):
        if j not in m.b_to_a and j not in m.derived_b and b.op(j) != "Constant":
            groups_b.setdefault((b.op(j), b.layers[j]), []).append(j)
    for key, left in groups_a.items():
        right = groups_b.get(key, [])
        if len(left) == len(right):
            for i, j in zip(left, right, strict=True):
                m.add(i, j, "position")


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
    """Initializers of A -> B: by name, then renamed ones read at the same input of matched nodes."""
    pairs = {name: name for name in a.initializers if name in b.initializers}
    taken_b = set(pairs.values())
    for i, j in m.a_to_b.items():
        for x, y in zip(input_names(a.nodes[i]), input_names(b.nodes[j]), strict=False):
            if x in a.initializers and y in b.initializers and x not in pairs and y not in taken_b:
                pairs[x] = y
                taken_b.add(y)
    return pairs


class Unmatched:
    """Why a node found no partner, pass by pass, in words (as onnxscript's rewriter says why a rule did not
    match): `why(i)` for a node of `this` that no node of `other` was matched to."""

    def __init__(self, this: GraphIndex, other: GraphIndex, partner: dict[int, int], other_partner: dict[int, int]):
        self.this, self.other, self.partner, self.other_partner = this, other, partner, other_partner
        self.names_this = Counter(n.name for n in this.nodes if n.name)
        self.names_other = Counter(n.name for n in other.nodes if n.name)
        self.where_other = {n.name: j for j, n in enumerate(other.nodes) if n.name}
        self.free_this = Counter((this.op(i), this.layers[i]) for i in range(len(this)) if i not in partner)
        self.free_other = Counter((other.op(j), other.layers[j]) for j in range(len(other)) if j not in other_partner)

    def why(self, i: int) -> str:
        this, other = self.this, self.other
        node, op, reasons = this.nodes[i], this.op(i), []
        if not node.name:
            reasons.append("it has no name")
        elif self.names_this[node.name] > 1 or self.names_other[node.name] > 1:
            reasons.append(f"its name {node.name!r} is not unique")
        elif node.name in self.where_other:
            j = self.where_other[node.name]
            reasons.append(f"the other graph's {node.name!r} is a {other.op(j)}")
        else:
            reasons.append(f"no node named {node.name!r} in the other graph")
        made = [(o, other.producer[o][0]) for o in output_names(node) if o in other.producer]
        if not made:
            reasons.append("none of its outputs is computed there")
        else:
            out, j = made[0]
            reasons.append(f"its output {out!r} comes from a {other.op(j)} there")
        for k, name in enumerate(input_names(node)):
            p = this.producer.get(name, (None, 0))[0] if name else None
            if p is not None and p not in self.partner:
                reasons.append(f"input {k} comes from unmatched {this.label(p)!r}")
                break
        else:
            reasons.append(f"no {op} there reads the same inputs")
        key = (op, this.layers[i])
        reasons.append(f"{self.free_this[key]} unmatched {op} here vs {self.free_other[key]} there in its layer")
        return "; ".join(reasons)
