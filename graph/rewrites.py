"""Recognise the pipeline's own rewrites in a node matching, so that the diff reports them as one entry each.

- quantized: a matched linear whose weight became float8 (MatMul/Gemm, or a MoE node's expert weights).
  It claims the unmatched nodes feeding it on either side (weight DequantizeLinear, Reshape/Mul, the
  activation's ReduceMax(Abs) / 448 -> QuantizeLinear -> DequantizeLinear, a removed Transpose) and the
  initializers they read that changed, appeared or disappeared.
- lowered: a custom node of A replaced by nodes of B named `<custom node>/<body node>` (inlined), or by
  a node of another op (com.microsoft::MoE for dsv3c::MoE) plus what was added to feed it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from dsv3c.graph.diff_types import Rewrite
from dsv3c.graph.index import GraphIndex, is_custom
from dsv3c.graph.linears import Linear, short_name
from dsv3c.graph.match import Matching

# ops that online activation quantization and weight dequantization are built from
_QDQ_HELPERS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Reshape", "Abs", "ReduceMax", "Div", "Mul",
     "Max", "Min", "Clip", "Cast", "CastLike", "Transpose", "Constant", "Expand", "Tile", "Unsqueeze", "Squeeze",
     "Shape", "Gather", "Slice", "Concat", "Floor", "Ceil", "Log", "Exp", "Pow", "Reciprocal", "Identity",
     "Flatten", "Sqrt"}
)  # fmt: skip


@dataclass
class Claims:
    """What the rewrites explain: not to be reported again as single entries."""

    nodes_a: set[int] = field(default_factory=set)  # removed nodes of A
    nodes_b: set[int] = field(default_factory=set)  # added nodes of B
    pairs: set[int] = field(default_factory=set)  # matched nodes (A index) whose changes are explained
    inits_a: set[str] = field(default_factory=set)
    inits_b: set[str] = field(default_factory=set)


class _Grouper:
    def __init__(self, a: GraphIndex, b: GraphIndex, m: Matching, inits: dict[str, str]) -> None:
        self.a, self.b, self.m, self.inits = a, b, m, inits
        self.inits_b = set(inits.values())
        self.claims = Claims()

    def _upstream(self, index: GraphIndex, starts: list[int], matched: dict[int, int], claimed: set[int],
                  only_helpers: bool) -> list[int]:  # fmt: skip
        """Unmatched, unclaimed nodes reachable backwards from the inputs of `starts` (claimed on the way)."""
        found, todo = [], [n for s in starts for n in index.nodes[s].input if n]
        while todo:
            tensor = todo.pop()
            if tensor not in index.producer:
                continue
            p = index.producer[tensor][0]
            if p in matched or p in claimed or (only_helpers and index.nodes[p].op_type not in _QDQ_HELPERS):
                continue
            claimed.add(p)
            found.append(p)
            todo.extend(n for n in index.nodes[p].input if n)
        return found

    def _initializers(self, rw: Rewrite, nodes_a: list[int], nodes_b: list[int], changed: set[str]) -> None:
        """Claim the initializers read by the rewrite's nodes that were removed, added or changed."""
        for name in {n for i in nodes_a for n in self.a.nodes[i].input if n in self.a.initializers}:
            if name in self.claims.inits_a:
                continue
            if name not in self.inits:
                rw.removed_initializers.append(name)
                self.claims.inits_a.add(name)
            elif name in changed:
                rw.changed_initializers.append(name)
                self.claims.inits_a.add(name)
        for name in {n for j in nodes_b for n in self.b.nodes[j].input if n in self.b.initializers}:
            if name not in self.inits_b and name not in self.claims.inits_b:
                rw.added_initializers.append(name)
                self.claims.inits_b.add(name)
        for values in (rw.removed_initializers, rw.added_initializers, rw.changed_initializers):
            values.sort()

    def quantized(self, linears_a: list[Linear], linears_b: list[Linear], changed: set[str]) -> list[Rewrite]:
        by_b = {lin.node: lin for lin in linears_b}
        found = []
        for old in linears_a:
            j = self.m.a_to_b.get(old.node)
            new = by_b.get(j) if j is not None else None
            if new is None or j is None or old.fp8_weight or not new.fp8_weight:
                continue
            i = old.node
            # the weight path may keep matched nodes (a Transpose): their changes belong to this rewrite too
            kept_a = [t for t in old.trace_nodes if t in self.m.a_to_b]
            kept_b = [t for t in new.trace_nodes if t in self.m.b_to_a]
            self.claims.pairs.update([*kept_a, *(self.m.b_to_a[t] for t in kept_b)])
            removed = self._upstream(self.a, [i, *kept_a], self.m.a_to_b, self.claims.nodes_a, only_helpers=True)
            added = self._upstream(self.b, [j, *kept_b], self.m.b_to_a, self.claims.nodes_b, only_helpers=True)
            moe = self.b.nodes[j].op_type in ("MoE", "QMoE")
            target = _experts_name(new.weights) if moe else ", ".join(short_name(w) for w in new.weights)
            rw = Rewrite("quantized", f"quantized ({new.scheme})", self.a.layers[i], target, self.a.op(i),
                         [self.b.label(x) for x in added], [self.a.label(x) for x in removed])  # fmt: skip
            self._initializers(rw, [i, *kept_a, *removed], [j, *kept_b, *added], changed)
            self.claims.pairs.add(i)
            found.append(rw)
        return found

    def lowered(self, changed: set[str]) -> list[Rewrite]:
        found = []
        for i, node in enumerate(self.a.nodes):
            inlined = self.m.inlined.get(i, [])
            j = self.m.a_to_b.get(i)
            replaced = j is not None and self.b.op(j) != self.a.op(i)
            if not is_custom(node) or not (inlined or replaced):
                continue
            self.claims.nodes_b.update(inlined)
            starts = [*inlined, *([j] if j is not None else [])]
            fed = self._upstream(self.b, starts, self.m.b_to_a, self.claims.nodes_b, only_helpers=False)
            added = [*inlined, *fed]
            if j is not None:
                label = f"lowered (to {self.b.op(j)})"
                self.claims.pairs.add(i)
            else:
                label = f"lowered (inlined, {len(inlined)} nodes)"
                self.claims.nodes_a.add(i)
            rw = Rewrite("lowered", label, self.a.layers[i], self.a.label(i), self.a.op(i),
                         [self.b.label(x) for x in added])  # fmt: skip
            self._initializers(rw, [i], [*starts, *fed], changed)
            found.append(rw)
        return found


def _experts_name(weights: tuple[str, ...]) -> str:
    """`model.layers.3.mlp.experts.gate_proj`, `...up_proj`, `...down_proj` -> `mlp.experts`."""
    parts = [short_name(w).split(".") for w in weights]
    common = [p[0] for p in itertools.takewhile(lambda p: len(set(p)) == 1, zip(*parts, strict=False))]
    return ".".join(common) or short_name(weights[0])


def group_rewrites(a: GraphIndex, b: GraphIndex, m: Matching, inits: dict[str, str], linears_a: list[Linear],
                   linears_b: list[Linear], changed: set[str]) -> tuple[list[Rewrite], Claims]:  # fmt: skip
    """The pipeline rewrites between A and B; `changed`: initializers of A whose B counterpart differs."""
    grouper = _Grouper(a, b, m, inits)
    rewrites = grouper.lowered(changed) + grouper.quantized(linears_a, linears_b, changed)
    return rewrites, grouper.claims
