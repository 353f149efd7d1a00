"""Structural diff of two ONNX graphs (or two export folders, paired by role).

Nodes are matched (graph/match.py), the pipeline's own rewrites are grouped (graph/rewrites.py), and what
remains is reported node by node and initializer by initializer, each entry with its layer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.errors import UserError
from dsv3c.graph.diff_types import Change, DiffReport, EntryKind, GraphDiff, InitializerChange, NodeChange
from dsv3c.graph.index import GraphIndex, attribute_text, constant_key, elem_type, layer_of_name, op_label
from dsv3c.graph.load import LoadedGraph, graph_paths, load_graph
from dsv3c.graph.marks import Marks
from dsv3c.graph.match import Matching, Unmatched, match_initializers, match_nodes
from dsv3c.graph.rewrites import Claims, group_rewrites
from dsv3c.graph.stats import compare_tensors
from dsv3c.graph.summary import function_label
from dsv3c.onnxkit.dtypes import dtype_name


class _Sources:
    """Where each input of a node comes from, in A's terms, so that renamed tensors compare equal.

    A Constant is its value; a duplicate that the cleanup merged is the node it was merged into; what a
    lowered node produced, and what replaced it in B, is that lowered node.
    """

    def __init__(self, a: GraphIndex, b: GraphIndex, m: Matching, inits: dict[str, str], claims: Claims) -> None:
        self.a, self.b, self.m, self.claims = a, b, m, claims
        self.inits_back = {y: x for x, y in inits.items()}

    def of_a(self, value: ir.Value | None) -> Hashable:
        if value is None or not value.name:
            return ""
        p = self.a.producer(value)
        if p is not None:
            constant = constant_key(p)
            if constant is not None:
                return constant
            if p in self.claims.lowered_a:
                return ("lowered", self.claims.lowered_a[p])
            return ("n", self.claims.merged_a.get(p, p), value.index())
        return ("i", value.name) if value.name in self.a.initializers else ("g", value.name)

    def of_b(self, value: ir.Value | None) -> Hashable:
        if value is None or not value.name:
            return ""
        p = self.b.producer(value)
        if p is not None:
            constant = constant_key(p)
            if constant is not None:
                return constant
            if p in self.claims.lowered_b:
                return ("lowered", self.claims.lowered_b[p])
            return ("n", self.m.b_to_a.get(p, ("b", p)), value.index())
        if value.name in self.b.initializers:
            return ("i", self.inits_back.get(value.name, ("b", value.name)))
        return ("g", value.name)


def _name(value: ir.Value | None) -> str:
    """A tensor as ONNX writes it: its name, "" for an omitted optional input."""
    return value.name or "" if value is not None else ""


def _node_changes(
    a: GraphIndex,
    b: GraphIndex,
    na: ir.Node,
    nb: ir.Node,
    src: _Sources,
    explained: frozenset[int] | set[int] = frozenset(),
) -> list[Change]:
    changes = []
    if op_label(na) != op_label(nb):
        changes.append(Change("op", op_label(na), op_label(nb)))
    if (na.name or "") != (nb.name or ""):
        changes.append(Change("name", na.name or "", nb.name or ""))
    attrs_a = {k: attribute_text(x) for k, x in na.attributes.items()}
    attrs_b = {k: attribute_text(x) for k, x in nb.attributes.items()}
    for key in sorted(attrs_a.keys() | attrs_b.keys()):
        if attrs_a.get(key) != attrs_b.get(key):
            changes.append(Change(f"attribute {key}", attrs_a.get(key, "(none)"), attrs_b.get(key, "(none)")))
    if len(na.inputs) != len(nb.inputs):
        changes.append(Change("inputs", str(len(na.inputs)), str(len(nb.inputs))))
    for k, (x, y) in enumerate(zip(na.inputs, nb.inputs, strict=False)):
        # the same computed tensor name: e.g. a lowering kept the output name, or it was folded to a constant
        same_tensor = (
            bool(_name(x))
            and _name(x) == _name(y)
            and a.producer(x) is not None
            and (b.producer(y) is not None or _name(y) in b.initializers)
        )
        if k not in explained and not same_tensor and src.of_a(x) != src.of_b(y):
            changes.append(Change(f"input {k}", _name(x) or "(none)", _name(y) or "(none)"))
    if len(na.outputs) != len(nb.outputs):
        changes.append(Change("outputs", str(len(na.outputs)), str(len(nb.outputs))))
    for k, (u, v) in enumerate(zip(na.outputs, nb.outputs, strict=False)):
        ta, tb = elem_type(u), elem_type(v)
        if ta and tb and ta != tb:
            changes.append(Change(f"output {k} dtype", dtype_name(ta), dtype_name(tb)))
    return changes


def _value_infos(values: list[ir.Value]) -> dict[str, str]:
    def text(v: ir.Value) -> str:
        dtype = dtype_name(int(v.dtype) if v.dtype is not None else 0)
        if v.shape is None:
            return dtype
        dims = [str(d) if isinstance(d, int) else d.value or "?" for d in v.shape.dims]
        return f"{dtype}[{', '.join(dims)}]"

    return {v.name or "": text(v) for v in values}


def _keyed_changes(what: str, a: dict[str, str], b: dict[str, str]) -> list[Change]:
    return [
        Change(f"{what} {k}", a.get(k, "(none)"), b.get(k, "(none)"))
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]


def _model_changes(a: LoadedGraph, b: LoadedGraph) -> list[Change]:
    ma, mb = a.model, b.model
    changes = _keyed_changes("", {"ir_version": str(ma.ir_version)}, {"ir_version": str(mb.ir_version)})
    changes += _keyed_changes(
        "opset",
        {d or "ai.onnx": str(v) for d, v in ma.opset_imports.items()},
        {d or "ai.onnx": str(v) for d, v in mb.opset_imports.items()},
    )

    def functions(m: ir.Model) -> dict[str, str]:
        return {function_label(f): f"{len(f)} nodes #{_function_digest(f)}" for f in m.functions.values()}

    changes += _keyed_changes("function", functions(ma), functions(mb))
    inits_a, inits_b = set(a.tensors), set(b.tensors)
    changes += _keyed_changes(
        "input",
        _value_infos([v for v in a.graph.inputs if v.name not in inits_a]),
        _value_infos([v for v in b.graph.inputs if v.name not in inits_b]),
    )
    changes += _keyed_changes("output", _value_infos(list(a.graph.outputs)), _value_infos(list(b.graph.outputs)))
    for c in changes:
        c.field = c.field.strip()
    return changes


def _function_digest(function: ir.Function) -> str:
    """A digest of what a function computes: its value_info (shape annotations a cleanup adds) and docs left out."""
    proto = ir.serde.serialize_function(function)
    del proto.value_info[:]
    proto.doc_string = ""
    return hashlib.sha1(proto.SerializeToString(deterministic=True)).hexdigest()[:10]


def _initializer_changes(
    a: LoadedGraph, b: LoadedGraph, inits: dict[str, str], values: bool
) -> list[InitializerChange]:
    found = []
    for x, y in inits.items():
        ta, tb = a.tensors[x], b.tensors[y]
        changes = []
        if ta.dtype != tb.dtype:
            changes.append(Change("dtype", ta.dtype, tb.dtype))
        if ta.shape != tb.shape:
            changes.append(Change("shape", str(list(ta.shape)), str(list(tb.shape))))
        if (ta.data == "missing") != (tb.data == "missing"):
            changes.append(
                Change(
                    "data",
                    "missing" if ta.data == "missing" else "present",
                    "missing" if tb.data == "missing" else "present",
                )
            )
        cmp = compare_tensors(a, x, b, y) if values else None
        if cmp is not None and not cmp.equal and not changes:
            changes.append(Change("values", "", "differ"))
        if x != y:
            changes.insert(0, Change("name", x, y))
        if changes:
            kind: EntryKind = "changed" if any(c.field != "name" for c in changes) else "renamed"
            found.append(
                InitializerChange(
                    kind,
                    x,
                    y,
                    layer_of_name(x),
                    changes,
                    cmp.stats_a if cmp else None,
                    cmp.stats_b if cmp else None,
                    cmp.max_abs_diff if cmp and not cmp.equal else None,
                )
            )
    return found


def _node_entries(a: GraphIndex, b: GraphIndex, m: Matching, src: _Sources, claims: Claims) -> list[NodeChange]:
    entries = []
    for x, y in m.a_to_b.items():
        if x in claims.pairs:
            continue
        changes = _node_changes(a, b, x, y, src, claims.inputs.get(x, set()))
        if changes:
            kind: EntryKind = "renamed" if all(c.field == "name" for c in changes) else "changed"
            entries.append(NodeChange(kind, op_label(x), x.name or "", y.name or "", a.layer(x), m.method[x], changes))
    removed = [n for n in a.nodes if n not in m.a_to_b and n not in claims.nodes_a]
    added = [n for n in b.nodes if n not in m.b_to_a and n not in claims.nodes_b]
    if removed:
        why_a = Unmatched(a, b, m.a_to_b, m.b_to_a).why
        entries += [NodeChange("removed", op_label(n), a.label(n), "", a.layer(n), why=why_a(n)) for n in removed]
    if added:
        why_b = Unmatched(b, a, m.b_to_a, m.a_to_b).why
        entries += [NodeChange("added", op_label(n), "", b.label(n), b.layer(n), why=why_b(n)) for n in added]
    return entries


def _stages(model: ir.Model) -> list[str]:
    props = model.metadata_props
    return [s for s in props.get(provenance.MODEL_STAGES, "").split("\n") if s]


def stages_between(a: ir.Model, b: ir.Model) -> list[str]:
    """The stages B's provenance lists after those A's lists (all of B's when A is not where B started)."""
    sa, sb = _stages(a), _stages(b)
    return sb[len(sa) :] if sb[: len(sa)] == sa else sb


def diff_graphs(a: LoadedGraph, b: LoadedGraph, values: bool = True) -> tuple[GraphDiff, Matching]:
    """Compare two loaded graphs; `values`: also compare initializer data where both sides have it."""
    ia, ib = GraphIndex(a.graph), GraphIndex(b.graph)
    marks = Marks(ib)
    m = match_nodes(ia, ib, marks)
    inits = match_initializers(ia, ib, m)
    init_entries = _initializer_changes(a, b, inits, values)
    changed = {e.name_a for e in init_entries if e.kind == "changed"}
    stages = stages_between(a.model, b.model)
    # B lists the stages that ran since A: dsv3c's passes wrote it, and (since marks revision 2) its cleanup
    # marked every merge it made; an older folder's merges into stage-made nodes are found by structure
    merged_by_marks = bool(stages) and provenance.merges_recorded(b.model)
    rewrites, claims = group_rewrites(ia, ib, m, inits, changed, marks, merges_marked=merged_by_marks)
    init_entries = [e for e in init_entries if e.name_a not in claims.inits_a]
    init_entries += [
        InitializerChange("removed", x, "", layer_of_name(x))
        for x in a.tensors
        if x not in inits and x not in claims.inits_a
    ]
    matched_b = set(inits.values())
    init_entries += [
        InitializerChange("added", "", y, layer_of_name(y))
        for y in b.tensors
        if y not in matched_b and y not in claims.inits_b
    ]
    nodes = _node_entries(ia, ib, m, _Sources(ia, ib, m, inits, claims), claims)
    result = GraphDiff(
        a.role or b.role,
        str(a.path),
        str(b.path),
        len(ia),
        len(ib),
        m.counts(),
        _model_changes(a, b),
        rewrites,
        nodes,
        init_entries,
        stages=stages,
    )
    return result, m


def diff_paths(
    a: Path,
    b: Path,
    numeric: bool = False,
    values: bool = True,
    seed: int = 0,
    given: dict[str, np.ndarray] | None = None,
) -> DiffReport:
    """Diff two .onnx files, or two export folders graph by graph (paired by role); `given`: numeric inputs
    by name used as they are (the others seeded, to match)."""
    paths_a, paths_b = graph_paths(a), graph_paths(b)
    if (list(paths_a) == [""]) != (list(paths_b) == [""]):
        raise UserError(f"cannot diff a file against an export folder ({a} vs {b}); pass two files or two folders")
    report = DiffReport(str(a), str(b))
    report.only_a = [r for r in paths_a if r not in paths_b]
    report.only_b = [r for r in paths_b if r not in paths_a]
    for role in [r for r in paths_a if r in paths_b]:
        ga, gb = load_graph(paths_a[role], role), load_graph(paths_b[role], role)
        result, matching = diff_graphs(ga, gb, values)
        if numeric:
            from dsv3c.graph.numeric import compare_numeric

            result.numeric = compare_numeric(ga, gb, matching, seed, given)
        report.graphs.append(result)
    return report
