"""Recognise the pipeline's own rewrites in a node matching, so that the diff reports them as one entry each.

What dsv3c's passes made carries their provenance marks (graph/marks.py): a quantized weight's or
activation's nodes, and a lowered node's replacement, are then taken as the marks group them, with the
labels the marks give. Without marks (a graph another tool wrote) each rewrite is found from the graphs'
structure, not from names (names only help the matching, graph/match.py):

- quantized: an initializer that is float in A and float8 in B (the same name, or a renamed one found
  through the nodes that read it) is a quantized weight. On B's side the rewrite takes the unmatched
  nodes on the weight's way to its reader (DequantizeLinear, a Cast) and the constant subgraph feeding
  them (the scales' Unsqueeze/Expand/Reshape/Slice); the reader (the Transpose of a MatMul linear, a
  dsv3c::MLAAttention or MoE node) keeps its match, and its rewired input is explained. For a MatMul
  linear, the activation's online or static Q/DQ in front of its data input belongs to the rewrite
  too (shared by the linears that read one activation: the first one claims it). A MoE node's expert
  weights make one rewrite. Each says its scheme, weight and scale shapes, and how the activation runs.
- merged: a node of A that is gone from B because it computes what another, matched node of A computes
  (common subexpression elimination). When dsv3c's cleanup ran between A and B, its marks say so: each
  survivor is marked `merged` with the duplicates it absorbed as its origin (passes/merge_duplicates.py),
  or, when a stage made it and it keeps that stage's marks, names them in `dsv3c.merged_from`. Without
  marks, duplicates are found by replaying the elimination over A (the same op, attributes and inputs).
  Also a Constant whose value a constant of B still holds (its readers compare constants by value,
  whoever removed it). Consumers rewired to the survivor are not changes.
- lowered: a node of A replaced by nodes of B named `<node>/<what>` (inlined custom nodes, a MoE turned
  into com.microsoft::MoE plus routing, MLA into opset-23 Attention, a RoPE pattern into
  RotaryEmbedding, a blocked DequantizeLinear into per-tensor DequantizeLinear * scales), or by a node
  of another op that kept its output name, or, without either clue, by the unmatched nodes of B between
  the custom node's matched neighbours. Labelled by the kernel it became ("to com.microsoft::MoE",
  "to Attention") or "inlined, N nodes". The nodes of A that only fed the replaced node go with it.
- folded: nodes of A whose outputs are constants in B under the same name (constant folding once the
  shapes are static).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.graph.diff_types import Rewrite
from dsv3c.graph.index import GraphIndex, constant_key, int_attr, is_custom, layer_of_name, op_label
from dsv3c.graph.marks import Marks
from dsv3c.graph.match import Matching, attribute_digest
from dsv3c.onnxkit.dtypes import dtype_name
from dsv3c.onnxkit.linears import (
    FP8_TYPES,
    MOE_OPS,
    WEIGHT_PATH,
    Linear,
    LinearFinder,
    dims_of,
    dtype_of,
    short_name,
)


def _ops(names: str) -> frozenset[str]:
    return frozenset(names.split())


# ops that online activation quantization and weight dequantization are built from
_QDQ_HELPERS = _ops(
    "QuantizeLinear DequantizeLinear DynamicQuantizeLinear Reshape Abs ReduceMax Div Mul Max Min Clip "
    "Cast CastLike Transpose Constant Expand Tile Unsqueeze Squeeze Shape Gather Slice Concat Floor Ceil "
    "Log Exp Pow Reciprocal Identity Flatten Sqrt Pad"
)
# ops a lowering may lower to that are worth naming: "lowered (to Attention)"
FUSED_OPS = _ops(
    "Attention RotaryEmbedding RMSNormalization LayerNormalization MultiHeadAttention GroupQueryAttention "
    "SkipLayerNormalization SimplifiedLayerNormalization SkipSimplifiedLayerNormalization MoE QMoE"
)
# ops that only move, reshape or make data: left out of a lowering's "to X + Y" label
_PLUMBING = _ops(
    "Constant Shape Reshape Transpose Unsqueeze Squeeze Concat Slice Gather Expand Cast CastLike Split "
    "Identity Range Flatten Pad Tile ConstantOfShape Size"
)
# ops between a weight's reader and the linear that uses it (a Transpose of the weight, a Cast)
_TO_USER = frozenset({"Transpose", "Cast", "CastLike", "Reshape", "Identity", "Squeeze", "Unsqueeze"})
_FORWARD_DEPTH = 8


@dataclass
class Claims:
    """What the rewrites explain: not to be reported again as single entries."""

    nodes_a: set[ir.Node] = field(default_factory=set)  # removed nodes of A
    nodes_b: set[ir.Node] = field(default_factory=set)  # added nodes of B
    pairs: set[ir.Node] = field(default_factory=set)  # matched nodes of A whose changes are all explained
    inputs: dict[ir.Node, set[int]] = field(default_factory=dict)  # matched node of A -> inputs rewired on purpose
    inits_a: set[str] = field(default_factory=set)
    inits_b: set[str] = field(default_factory=set)
    merged_a: dict[ir.Node, ir.Node] = field(default_factory=dict)  # removed duplicate of A -> the matched node of A
    lowered_a: dict[ir.Node, ir.Node] = field(default_factory=dict)  # node of A -> the lowered node it went with
    lowered_b: dict[ir.Node, ir.Node] = field(default_factory=dict)  # node of B -> the lowered node of A it came from

    def explain(self, node: ir.Node, k: int) -> None:
        self.inputs.setdefault(node, set()).add(k)


class _Grouper:
    def __init__(
        self,
        a: GraphIndex,
        b: GraphIndex,
        m: Matching,
        inits: dict[str, str],
        changed: set[str],
        marks: Marks,
        merges_marked: bool,
    ) -> None:
        self.a, self.b, self.m, self.inits, self.changed, self.marks = a, b, m, inits, changed, marks
        self.merges_marked = merges_marked
        self.inits_back = {y: x for x, y in inits.items()}
        self.claims = Claims()
        self.finder_a, self.finder_b = LinearFinder(a.graph), LinearFinder(b.graph)
        self.linear_a = {linear.node: linear for linear in self.finder_a.find()}
        self.linears_b = self.finder_b.find()
        self.linear_of_weight: dict[str, Linear] = {}
        for linear in self.linears_b:
            for w in linear.weight_names:
                self.linear_of_weight.setdefault(w, linear)
        self.activation_owner: dict[ir.Node, Rewrite] = {}  # B node of an activation Q/DQ -> the rewrite claiming it
        self.activations_seen: set[ir.Node] = set()  # B linears whose activation _activation looked at
        self.owner_a: dict[ir.Node, Rewrite] = {}  # claimed node -> its rewrite
        self.owner_b: dict[ir.Node, Rewrite] = {}
        self._a_by_name: dict[str, ir.Node] | None = None  # built on first use, by _named_origin

    def _own(self, rw: Rewrite, nodes_a: Iterable[ir.Node], nodes_b: Iterable[ir.Node]) -> None:
        self.owner_a.update(dict.fromkeys(nodes_a, rw))
        self.owner_b.update(dict.fromkeys(nodes_b, rw))

    # ---- helpers ---------------------------------------------------------------------------------------

    def free_a(self, node: ir.Node) -> bool:
        return node not in self.m.a_to_b and node not in self.claims.nodes_a and node not in self.m.derived

    def free_b(self, node: ir.Node) -> bool:
        return node not in self.m.b_to_a and node not in self.claims.nodes_b and node not in self.m.derived_b

    def _upstream(
        self,
        index: GraphIndex,
        tensors: Iterable[ir.Value | None],
        free: Callable[[ir.Node], bool],
        claimed: set[ir.Node],
        ops: frozenset[str] | None,
    ) -> list[ir.Node]:
        """Free nodes reachable backwards from `tensors` (claimed on the way); `ops`: only through these."""
        found, todo = [], [t for t in tensors if t is not None and t.name]
        while todo:
            p = index.producer(todo.pop())
            if p is None or p in claimed or not free(p) or (ops is not None and p.op_type not in ops):
                continue
            claimed.add(p)
            found.append(p)
            todo.extend(v for v in p.inputs if v is not None and v.name)
        return found

    def _dominated(self, index: GraphIndex, starts: list[ir.Node], free: Callable[[ir.Node], bool]) -> list[ir.Node]:
        """Free nodes upstream of `starts` whose outputs are read only inside the region (nodes that only fed it)."""
        first = set(starts)
        region, seen = set(starts), set(starts)
        heap = [-index.position[s] for s in starts]
        heapq.heapify(heap)  # the latest node first: its readers are decided before it
        found = []
        while heap:
            node = index.nodes[-heapq.heappop(heap)]
            if node not in first:
                if index.is_output(node) or not set(index.readers(node)) <= region or not free(node):
                    continue
                region.add(node)
                found.append(node)
            for value in node.inputs:
                p = index.producer(value)
                if p is not None and p not in seen:
                    seen.add(p)
                    heapq.heappush(heap, -index.position[p])
        return found

    def _forward(
        self, index: GraphIndex, tensor: ir.Value, free: Callable[[ir.Node], bool]
    ) -> tuple[list[ir.Node], list[tuple[ir.Node, int]]]:
        """From a weight: the free constant-path nodes it flows through, and where it is read after them."""
        path, readers, todo, seen = [], [], [(tensor, 0)], set()
        while todo:
            value, depth = todo.pop()
            for node, k in index.uses(value):
                if node in seen:
                    continue
                seen.add(node)
                on_path = node.op_type in WEIGHT_PATH and node.domain in ("", "ai.onnx")
                if free(node) and on_path and depth < _FORWARD_DEPTH:
                    path.append(node)
                    todo += [(out, depth + 1) for out in node.outputs if out.name]
                else:
                    readers.append((node, k))
        return path, readers

    def _user(self, index: GraphIndex, node: ir.Node) -> ir.Node:
        """From a weight's reader, the linear that uses it: through a Transpose/Cast to the MatMul or custom node."""
        for _ in range(4):
            if node.op_type not in _TO_USER or len(node.outputs) != 1:
                return node
            users = index.uses(node.outputs[0])
            if len(users) != 1:
                return node
            node = users[0][0]
        return node

    def _initializers(self, rw: Rewrite, nodes_a: Iterable[ir.Node], nodes_b: Iterable[ir.Node]) -> None:
        """Claim the initializers read by the rewrite's nodes that were removed, added or changed."""
        for name in _initializer_names(self.a, nodes_a):
            if name in self.claims.inits_a:
                continue
            if name not in self.inits:
                rw.removed_initializers.append(name)
                self.claims.inits_a.add(name)
            elif name in self.changed:
                rw.changed_initializers.append(name)
                self.claims.inits_a.add(name)
        for name in _initializer_names(self.b, nodes_b):
            if name not in self.inits_back and name not in self.claims.inits_b:
                rw.added_initializers.append(name)
                self.claims.inits_b.add(name)

    def sweep(self) -> None:
        """Nodes left over that only fed nodes of rewrites (a constant shared by several) go with the first."""
        for index, free, owner, removed in (
            (self.a, self.free_a, self.owner_a, True),
            (self.b, self.free_b, self.owner_b, False),
        ):
            for node in reversed(index.nodes):
                users = index.readers(node)
                if not free(node) or not users or index.is_output(node):
                    continue
                if all(u in owner for u in users):
                    rw = owner[users[0]]
                    owner[node] = rw
                    if removed:
                        self.claims.nodes_a.add(node)
                        rw.removed_nodes.append(self.a.label(node))
                        self._initializers(rw, [node], [])
                    else:
                        self.claims.nodes_b.add(node)
                        rw.added_nodes.append(self.b.label(node))
                        self._initializers(rw, [], [node])

    # ---- merged (common subexpressions) ------------------------------------------------------------------

    def _merged_by_marks(self) -> dict[ir.Node, ir.Node]:
        """Duplicate of A -> the matched node of A it was merged into, as the survivors' marks name them (an origin
        that is no node of A was merged before A or made after it)."""
        named = Counter(n.name for n in self.a.nodes if n.name)
        where = {n.name: n for n in self.a.nodes if n.name and named[n.name] == 1}
        into: dict[ir.Node, ir.Node] = {}
        for survivor, origin in self.marks.merged.items():
            rep = self.m.b_to_a.get(survivor)
            for name in origin:
                duplicate = where.get(name)
                if duplicate is not None and rep is not None and duplicate is not rep:
                    into.setdefault(duplicate, rep)
        return into

    def _merged_by_structure(self) -> dict[ir.Node, ir.Node]:
        """Duplicate of A -> the matched node of A computing the same (same op, attributes and inputs), found by
        replaying common subexpression elimination over A in graph order."""
        canonical: dict[ir.Value, Hashable] = {}  # a value -> (its first computation, output index)
        first: dict[Hashable, ir.Node] = {}
        into: dict[ir.Node, ir.Node] = {}
        for node in self.a.nodes:
            operands = tuple(canonical.get(v, v.name) if v is not None else "" for v in node.inputs)
            rep = first.setdefault((op_label(node), attribute_digest(node), operands), node)
            for k, out in enumerate(node.outputs):
                canonical[out] = ("v", rep, k)
            if rep is not node and rep in self.m.a_to_b:
                into[node] = rep
        return into

    def merged(self) -> list[Rewrite]:
        a, b = self.a, self.b
        # dsv3c's cleanup marked every survivor with what it absorbed; structure speaks only for other graphs
        into = self._merged_by_marks() if self.merges_marked else self._merged_by_structure()
        b_constants = {k for node in b.nodes if (k := constant_key(node)) is not None}
        by_layer: dict[int | None, list[tuple[ir.Node, ir.Node | None]]] = {}
        for node in a.nodes:
            if not self.free_a(node):
                continue
            rep = into.get(node)
            if rep is not None:
                self.claims.merged_a[node] = rep
            elif constant_key(node) not in b_constants:
                continue  # else a constant whose value B still has (its readers compare constants by value)
            self.claims.nodes_a.add(node)
            by_layer.setdefault(a.layer(node), []).append((node, rep))
        found = []
        for layer, items in by_layer.items():
            ops = Counter(op_label(x) for x, _ in items)
            layers = sorted({y for _, r in items if r is not None and (y := a.layer(r)) is not None})
            where = f" of layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}" if layers else ""
            same = (["identical nodes" + where] if any(r is not None for _, r in items) else []) + (
                ["equal constants"] if any(r is None for _, r in items) else []
            )
            target = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in ops.items()) + " -> " + " / ".join(same)
            rw = Rewrite(
                "merged",
                f"merged ({len(items)} duplicate node{'s' if len(items) > 1 else ''})",
                layer,
                target,
                "",
                removed_nodes=[a.label(x) for x, _ in items],
            )
            self._own(rw, [x for x, _ in items], [])
            found.append(rw)
        return found

    # ---- quantized weights -------------------------------------------------------------------------------

    def _renamed_weight(self, y: str) -> str | None:
        """The float initializer of A that the fp8 initializer `y` of B replaces under another name, if any."""
        _, readers = self._forward(self.b, self.b.initializers[y], self.free_b)
        for reader, k in readers:
            partner = self.m.b_to_a.get(reader)
            if partner is None or k >= len(partner.inputs):
                continue
            trace = self.finder_a.trace(partner.inputs[k])
            weights = self.finder_a.weights(trace) if trace else []
            dims = list(dims_of(self.b.initializers[y]))
            for w in weights:
                if w.name not in self.inits and list(dims_of(w)) == dims:
                    return w.name
        return None

    def quantized(self) -> list[Rewrite]:
        groups: dict[Hashable, tuple[int, Rewrite]] = {}
        for y, t in self.b.initializers.items():
            if dtype_of(t) not in FP8_TYPES or y in self.claims.inits_b:
                continue
            x = self.inits_back.get(y) or self._renamed_weight(y)
            if x is None or dtype_of(self.a.initializers[x]) in FP8_TYPES or len(dims_of(self.a.initializers[x])) < 2:
                continue
            self._weight(x, y, groups)
        self._activations_only(groups)
        found = [rw for _, rw in sorted(groups.values(), key=lambda item: item[0])]
        for rw in found:
            rw.added_initializers.sort()
            rw.removed_initializers.sort()
        return found

    def _weight(self, x: str, y: str, groups: dict[Hashable, tuple[int, Rewrite]]) -> None:
        a, b, m, claims = self.a, self.b, self.m, self.claims
        weight_b = b.initializers[y]
        marked = self.marks.quantized_around(weight_b, self.free_b)
        if marked is not None:  # the pass said which nodes it made for this weight
            path_b, scales_b, readers_b = marked[0], [], self.marks.readers_outside(marked[0])
            claims.nodes_b.update(path_b)
        else:
            path_b, readers_b = self._forward(b, weight_b, self.free_b)
            claims.nodes_b.update(path_b)
            scales_b = self._upstream(
                b, [v for n in path_b for v in n.inputs], self.free_b, claims.nodes_b, _QDQ_HELPERS
            )
        path_a, readers_a = self._forward(a, a.initializers[x], self.free_a)
        claims.nodes_a.update(path_a)
        scales_a = self._upstream(a, [v for n in path_a for v in n.inputs], self.free_a, claims.nodes_a, _QDQ_HELPERS)
        user_a: ir.Node | None = None
        user_b: ir.Node | None = None
        for reader, k in readers_b:
            if reader in m.b_to_a:
                claims.explain(m.b_to_a[reader], k)
                user_b = self._user(b, reader) if user_b is None else user_b
            elif reader in m.derived_b and user_a is None:
                user_a = m.derived_b[reader]  # read inside a lowered node: the lowering reports the rest
        if user_b is not None and user_a is None:
            user_a = m.b_to_a.get(user_b)
        if user_a is None and readers_a:
            user_a = self._user(a, readers_a[0][0])
        linear = self.linear_of_weight.get(y)
        moe = user_a is not None and user_a.op_type in MOE_OPS
        experts = len(dims_of(weight_b)) == 3 and (moe or (linear is not None and linear.kind == "experts"))
        key: Hashable = ("experts", user_a) if experts else ("weight", y)
        order = a.position[user_a] if user_a is not None else len(a) + len(groups)
        if key not in groups:
            scheme = linear.scheme if linear is not None and linear.scheme else dtype_name(_dtype(weight_b))
            if marked is not None and marked[1].details:
                scheme = ", ".join(marked[1].details)
            layer = a.layer(user_a) if user_a is not None else layer_of_name(x)
            rw = Rewrite(
                "quantized", f"quantized ({scheme})", layer, "", op_label(user_a) if user_a is not None else ""
            )
            rw.stage = next((self.marks.of[n].stage or "" for n in path_b if n in self.marks.of), "")
            rw.weight_dtype = dtype_name(_dtype(weight_b))
            groups[key] = (order, rw)
        rw = groups[key][1]
        rw.weights.append(x if x == y else f"{x} -> {y}")
        rw.weight_shapes.append(list(dims_of(weight_b)))
        scale = self.finder_b.scale_of(weight_b)
        if scale is None and linear is not None and len(linear.weights) == 1:
            scale = linear.scale_shape
        rw.scale_shapes.append(list(scale) if scale is not None else [])
        names = [w.split(" -> ")[0] for w in rw.weights]
        rw.target = _experts_name(tuple(names)) if experts else short_name(names[0])
        rw.added_nodes += [b.label(n) for n in [*path_b, *scales_b]]
        rw.removed_nodes += [a.label(n) for n in [*path_a, *scales_a]]
        self._own(rw, [*path_a, *scales_a], [*path_b, *scales_b])
        self._initializers(rw, [*path_a, *scales_a], [*path_b, *scales_b])
        if x != y:
            if x not in claims.inits_a:
                rw.removed_initializers.append(x)
                claims.inits_a.add(x)
            if y not in claims.inits_b:
                rw.added_initializers.append(y)
                claims.inits_b.add(y)
        elif x in self.changed and x not in claims.inits_a:
            rw.changed_initializers.append(x)
            claims.inits_a.add(x)
        if user_b is not None and user_b.op_type in ("MatMul", "Gemm") and user_b in m.b_to_a:
            self._activation(rw, m.b_to_a[user_b], user_b)

    def _activations_only(self, groups: dict[Hashable, tuple[int, Rewrite]]) -> None:
        """Linears whose weight is the same on both sides (an FP8 checkpoint exports FP8 already) but whose
        activation a pass quantized, as its marks say: one rewrite each."""
        a, b, m = self.a, self.b, self.m
        for linear in self.linears_b:
            node = linear.node
            if node in self.activations_seen or node not in m.b_to_a or node.op_type not in ("MatMul", "Gemm"):
                continue
            producer = b.producer(node.inputs[0])
            mark = self.marks.of.get(producer) if producer is not None else None
            if mark is None or mark.rewrite is None or mark.rewrite.kind != provenance.QUANTIZED:
                continue
            if producer is not None and not self.free_b(producer) and producer not in self.activation_owner:
                continue  # the Q/DQ is in A too: nothing changed here
            user_a = m.b_to_a[node]
            scheme = linear.scheme or linear.weight_dtype
            label = f"activations quantized (weights {scheme} already)"
            rw = Rewrite("quantized", label, a.layer(user_a), "", op_label(user_a))
            rw.stage = mark.stage or ""
            rw.weight_dtype = linear.weight_dtype
            rw.weights = list(linear.weight_names)
            rw.weight_shapes = [list(linear.weight_shape)]
            rw.scale_shapes = [list(linear.scale_shape) if linear.scale_shape is not None else []]
            rw.target = short_name(linear.weight_names[0]) if linear.weights else b.label(node)
            self._activation(rw, user_a, node)
            groups[("activation", node)] = (a.position[user_a], rw)

    def _activation(self, rw: Rewrite, user_a: ir.Node, user_b: ir.Node) -> None:
        """Claim the Q/DQ in front of the linear's data input (or note whose it shares)."""
        self.activations_seen.add(user_b)
        b, claims = self.b, self.claims
        marked: provenance.Rewrite | None = None
        tensor = user_b.inputs[0]
        producer = b.producer(tensor)
        mark = self.marks.of.get(producer) if producer is not None else None
        if mark is not None and mark.rewrite is not None and mark.rewrite.kind == provenance.QUANTIZED:
            marked = mark.rewrite  # the pass said how it quantized this activation
        description = ", ".join(marked.details) if marked else self.finder_b.activation(tensor)
        if not description:
            return
        rw.activation = description
        claims.explain(user_a, 0)
        if producer is not None and producer in self.activation_owner and self.activation_owner[producer] is not rw:
            rw.shared_activation = self.activation_owner[producer].target
            return
        if marked is not None and producer is not None:
            found = [n for n in self.marks.group(producer) if self.free_b(n)]
        else:
            found = self._upstream(b, [tensor], self.free_b, set(), _QDQ_HELPERS)
        if not any(n.op_type in ("QuantizeLinear", "Cast") for n in found):
            return
        claims.nodes_b.update(found)
        for n in found:
            self.activation_owner[n] = rw
        self._own(rw, [], found)
        rw.added_nodes += [b.label(n) for n in b.in_order(found)]
        self._initializers(rw, [], found)

    # ---- lowered -----------------------------------------------------------------------------------------

    def _seeds(self, node: ir.Node) -> list[ir.Node]:
        """Without a naming clue: the free nodes of B that now produce what the matched readers of `node`'s outputs
        read (or B's graph outputs of the same names)."""
        a, b, m = self.a, self.b, self.m
        seeds: list[ir.Node] = []
        for out in node.outputs:
            for reader, k in a.uses(out):
                partner = m.a_to_b.get(reader)
                p = b.producer(partner.inputs[k]) if partner is not None and k < len(partner.inputs) else None
                if p is not None and self.free_b(p) and p not in seeds:
                    seeds.append(p)
            if (
                out in a.output_values
                and (p := b.made(out.name or "")) is not None
                and self.free_b(p)
                and p not in seeds
            ):
                seeds.append(p)
        return seeds

    def lowered(self) -> list[Rewrite]:
        a, b, m, claims = self.a, self.b, self.m, self.claims
        found = []
        for node in a.nodes:
            if node in claims.nodes_a:
                continue
            derived = [n for n in m.derived.get(node, []) if n not in claims.nodes_b]
            partner = m.a_to_b.get(node)
            replaced = partner is not None and op_label(partner) != op_label(node)
            if not derived and not replaced:
                if not (is_custom(node) and partner is None):
                    continue
                derived = self._seeds(node)  # no naming clue: what sits where the custom node was
                if not derived:
                    continue
            starts = [*derived, *([partner] if replaced and partner is not None else [])]
            claims.nodes_b.update(derived)
            fed = self._upstream(b, [v for s in starts for v in s.inputs], self.free_b, claims.nodes_b, None)
            group = b.in_order({*starts, *fed})
            removed = []
            if replaced:
                claims.pairs.add(node)
            elif partner is None:
                claims.nodes_a.add(node)
                # a fusion replaces several nodes at once (a residual Add and the RMSNorm it feeds): its marks
                # name them all, and one whose output the group still computes, read beyond it too, is not
                # dominated by `node`
                named = list(dict.fromkeys(self._named_origin(node, group) + self._outputs_kept(node, group)))
                claims.nodes_a.update(named)
                removed = named + self._dominated(a, [node, *named], self.free_a)
                claims.nodes_a.update(removed)
            for x in (node, *removed):
                claims.lowered_a[x] = node
            for y in group:
                claims.lowered_b[y] = node
            linear = self.linear_a.get(node) if node.op_type in ("MatMul", "Gemm") else None
            target = short_name(linear.weight_names[0]) if linear is not None else a.label(node)  # a linear: its weight
            rw = Rewrite(
                "lowered",
                self.marks.lowered_label(node, group) or self._label(node, group),
                a.layer(node),
                target,
                op_label(node),
                [b.label(x) for x in group],
                [a.label(x) for x in removed],
            )
            rw.stage = next((self.marks.of[y].stage or "" for y in group if y in self.marks.of), "")
            self._initializers(rw, [node, *removed], group)
            self._own(rw, [node, *removed], group)
            found.append(rw)
        return found

    def _named_origin(self, node: ir.Node, group: list[ir.Node]) -> list[ir.Node]:
        """The free nodes of A besides `node` that the lowering marks of `group` name as replaced."""
        if self._a_by_name is None:
            self._a_by_name = {n.name: n for n in self.a.nodes if n.name}
        names = [
            o
            for y in group
            if (mark := self.marks.of.get(y)) is not None
            and mark.rewrite is not None
            and mark.rewrite.kind == provenance.LOWERED
            and node.name in mark.origin
            for o in mark.origin
        ]
        found = (self._a_by_name.get(name) for name in dict.fromkeys(names))
        return [x for x in found if x is not None and x is not node and self.free_a(x)]

    def _outputs_kept(self, node: ir.Node, group: list[ir.Node]) -> list[ir.Node]:
        """The free nodes of A besides `node` whose outputs, under the same names, nodes of `group` compute."""
        made = (self.a.made(out.name) for y in group for out in y.outputs if out.name)
        return [x for x in dict.fromkeys(made) if x is not None and x is not node and self.free_a(x)]

    def _label(self, node: ir.Node, group: list[ir.Node]) -> str:
        kernels = [op_label(n) for n in group if is_custom(n) or n.op_type in FUSED_OPS]
        if kernels:
            return f"lowered (to {' + '.join(dict.fromkeys(kernels))})"
        if is_custom(node):
            return f"lowered (inlined, {len(group)} nodes)"
        ops = " + ".join(dict.fromkeys(op_label(n) for n in group if n.op_type not in _PLUMBING))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and int_attr(node, "block_size"):
            return f"lowered (blocked {node.op_type} as {ops or 'constants'})"
        return f"lowered (to {ops})" if ops else "lowered (rewritten)"

    # ---- folded ------------------------------------------------------------------------------------------

    def folded(self) -> list[Rewrite]:
        a, b, claims = self.a, self.b, self.claims

        def constant_in_b(name: str) -> bool:
            """B holds the tensor of this name (one of A's) as a constant: an initializer or a Constant's output."""
            if name in b.initializers:
                return True
            p = b.made(name)
            return p is not None and p.op_type == "Constant" and not p.inputs

        starts = [
            n
            for n in a.nodes
            if self.free_a(n) and n.outputs and all(constant_in_b(v.name) for v in n.outputs if v.name)
        ]
        if not starts:
            return []
        claims.nodes_a.update(starts)
        extra = self._dominated(a, starts, self.free_a)
        claims.nodes_a.update(extra)
        by_layer: dict[int | None, list[ir.Node]] = {}
        for n in a.in_order({*starts, *extra}):
            by_layer.setdefault(a.layer(n), []).append(n)
        found = []
        for layer, nodes in by_layer.items():
            outs = [v.name for n in nodes for v in n.outputs if v.name and constant_in_b(v.name)]
            made = [p for o in outs if (p := b.made(o)) is not None and self.free_b(p)]
            claims.nodes_b.update(made)
            ops = Counter(op_label(n) for n in nodes)
            count, s = len(nodes), "s" if len(nodes) > 1 else ""
            label = (
                f"lifted to initializers ({count} constant{s})"
                if set(ops) == {"Constant"}
                else f"folded to constants ({count} node{s})"
            )
            rw = Rewrite(
                "folded",
                label,
                layer,
                ", ".join(f"{op} x{k}" if k > 1 else op for op, k in ops.items()),
                "",
                [b.label(p) for p in made],
                [a.label(n) for n in nodes],
            )
            self._initializers(rw, nodes, made)
            self._own(rw, nodes, made)
            for o in outs:
                if o in b.initializers and o not in self.inits_back and o not in claims.inits_b:
                    rw.added_initializers.append(o)
                    claims.inits_b.add(o)
            found.append(rw)
        return found


def _initializer_names(index: GraphIndex, nodes: Iterable[ir.Node]) -> list[str]:
    """The names of the initializers `nodes` read, sorted (each once)."""
    return sorted({v.name for n in nodes for v in n.inputs if index.is_initializer(v) and v is not None and v.name})


def _dtype(value: ir.Value) -> int:
    dtype = dtype_of(value)
    return int(dtype) if dtype is not None else 0


def _experts_name(weights: tuple[str, ...]) -> str:
    """`model.layers.3.mlp.experts.gate_proj`, `...up_proj`, `...down_proj` -> `mlp.experts`."""
    parts = [short_name(w).split(".") for w in weights]
    common = [p[0] for p in itertools.takewhile(lambda p: len(set(p)) == 1, zip(*parts, strict=False))]
    return ".".join(common) or short_name(weights[0])


def group_rewrites(
    a: GraphIndex,
    b: GraphIndex,
    m: Matching,
    inits: dict[str, str],
    changed: set[str],
    marks: Marks | None = None,
    merges_marked: bool = False,
) -> tuple[list[Rewrite], Claims]:
    """The pipeline rewrites between A and B; `changed`: initializers of A whose B counterpart differs;
    `marks`: B's provenance marks, read first (structure is the fallback for nodes without them);
    `merges_marked`: dsv3c's cleanup ran between A and B, so B's `merged` marks say what it merged."""
    grouper = _Grouper(a, b, m, inits, changed, marks if marks is not None else Marks(b), merges_marked)
    merged = grouper.merged()
    quantized = grouper.quantized()
    lowered = grouper.lowered()
    folded = grouper.folded()
    grouper.sweep()
    return [*quantized, *lowered, *merged, *folded], grouper.claims
