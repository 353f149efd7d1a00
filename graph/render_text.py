"""Plain-text printers for `dsv3c inspect` and `dsv3c diff` results."""

from __future__ import annotations

import json
import re
from collections import defaultdict

from dsv3c.graph.diff_types import DiffReport, GraphDiff, InitializerChange, NodeChange, NumericReport, Rewrite
from dsv3c.graph.summary import GraphSummary, InspectReport, TensorSpec

PER_LAYER = 40  # entries printed per layer before "... N more"


def count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:g}"


def size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def layer_ranges(layers: list[int]) -> str:
    values = sorted(set(layers))
    parts, start = [], None
    for k, v in enumerate(values):
        start = v if start is None else start
        if k + 1 == len(values) or values[k + 1] != v + 1:
            parts.append(str(v) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def _specs(specs: list[TensorSpec]) -> str:
    """Tensors as `name dtype[shape]`; per-layer families (`past_ckv.0` ... `past_ckv.60`) on one line."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for s in specs:
        key = (re.sub(r"(?<=[._])\d+(?=$|[._])", "{i}", s.name), s.dtype, ", ".join(map(str, s.shape)))
        groups.setdefault(key, []).append(s.name)
    texts = [
        f"{name} {dtype}[{shape}] x{len(names)}" if len(names) > 1 else f"{names[0]} {dtype}[{shape}]"
        for (name, dtype, shape), names in groups.items()
    ]
    return ", ".join(texts) or "(none)"


# ---- inspect -------------------------------------------------------------------------------------------


def _graph_summary(s: GraphSummary) -> list[str]:
    title = f"{s.role}: {s.path}" if s.role else s.path
    opsets = ", ".join(f"{d} {v}" for d, v in s.opsets.items())
    lines = [
        f"== {title}",
        f"ir {s.ir_version} · opsets {opsets} · producer {s.producer or '(none)'}",
        f"nodes {s.nodes}; inputs {_specs(s.inputs)}; outputs {_specs(s.outputs)}",
    ]
    ops = list(s.ops.items())
    more = f", ... {len(ops) - 25} more" if len(ops) > 25 else ""
    lines.append("ops: " + ", ".join(f"{op} {n}" for op, n in ops[:25]) + more)
    lines.append(
        f"parameters {count(s.parameters)} in {sum(r.tensors for r in s.by_dtype)} initializers, {size(s.bytes)}"
    )
    lines += [
        f"  {r.dtype:<14} {r.tensors:>6} tensors {count(r.parameters):>10} params {size(r.bytes):>10}"
        + (f"  ({r.without_data} without data)" if r.without_data else "")
        for r in s.by_dtype
    ]
    note = {"missing": " (every initializer is declared without data, as in a --weights none export)"}
    lines.append(f"weight data: {s.data}{note.get(s.data, '')}")
    lines.append("custom nodes:" if s.custom_nodes else "custom nodes: (none)")
    for c in s.custom_nodes:
        where = f" (layers {layer_ranges(c.layers)})" if c.layers else ""
        attrs = ", ".join(f"{k}={v}" for k, v in c.attributes.items())
        lines.append(f"  {c.op} x{c.count}{where}: {attrs or '(no attributes)'}")
    if s.functions:
        lines.append("functions: " + ", ".join(f"{f} ({n} nodes)" for f, n in s.functions.items()))
    f = s.fp8
    schemes = "; ".join(f"{k}: {v}" for k, v in f.schemes.items())
    acts = "; ".join(f"{k}: {v}" for k, v in f.activations.items())
    lines.append(
        f"fp8: {100 * f.share:.1f}% of linear FLOPs ({count(f.fp8_flops)} of {count(f.flops)} per token); "
        f"{f.fp8_linears} of {f.linears} linears in fp8"
        + (f" (activations {acts})" if acts else "")
        + (
            f"; {f.weight_only} more with fp8 weights only ({100 * f.weight_only_share:.1f}% of FLOPs)"
            if f.weight_only
            else ""
        )
        + (f"; weight schemes: {schemes}" if schemes else "")
    )
    lines.append(f"cache inputs: {_specs(s.cache)}")
    for e in s.external_files:
        state = "missing" if e.size is None else f"{size(e.size)} on disk"
        lines.append(
            f"external data: {e.location}: {state}; {size(e.referenced_bytes)} referenced by {e.tensors} tensors"
        )
    if not s.external_files:
        lines.append("external data: (none)")
    if s.stages:
        made = ", ".join(f"{stage} {n}" for stage, n in s.stages.items() if n)
        lines.append(f"provenance: {len(s.stages)} stages ran; nodes they made: {made or '(none)'}")
    return lines


def render_inspect(report: InspectReport) -> str:
    lines = [
        f"{report.kind} {report.path}" + (f" ({len(report.graphs)} graphs)" if report.kind != "onnx model" else "")
    ]
    if report.cache_layout is not None:
        lines.append(f"cache layout (manifest): {json.dumps(report.cache_layout)}")
    for g in report.graphs:
        lines += ["", *_graph_summary(g)]
    return "\n".join(lines) + "\n"


# ---- diff ----------------------------------------------------------------------------------------------


def _shape(dims: list[int]) -> str:
    return "[" + ", ".join(map(str, dims)) + "]"


def _nodes(n: int) -> str:
    return f"{n} node{'s' if n != 1 else ''}"


def quantized_line(rw: Rewrite) -> str:
    """One quantized linear: its op, weight and scale shapes, and how its activation runs."""
    many = "s" if len(rw.weights) > 1 else ""
    parts = [f"weight{many} {rw.weight_dtype}" + ", ".join(_shape(d) for d in rw.weight_shapes)]
    if any(rw.scale_shapes):
        parts.append(f"scale{many} " + ", ".join(_shape(d) if d else "(none)" for d in rw.scale_shapes))
    if rw.activation:
        shared = f", shares {rw.shared_activation}'s Q/DQ" if rw.shared_activation else ""
        act = f"activations {rw.activation}{shared}"
    else:
        act = "weight-only (activations stay high precision" + (f" inside {rw.op})" if "::" in rw.op else ")")
    op = f" ({rw.op})" if rw.op else ""
    return f"{rw.target}{op}: {', '.join(parts)}; {act}"


def _stage(group: list[Rewrite]) -> str:
    """` [by fp8-weights]`: the stage whose marks the group's nodes carry ("" when inferred from structure)."""
    stages = list(dict.fromkeys(r.stage for r in group if r.stage))
    return f" [by {', '.join(stages)}]" if stages else ""


def rewrite_lines(rewrites: list[Rewrite]) -> list[str]:
    """The rewrites of one layer: quantized linears under one summary line per scheme, one line per linear
    below it; each lowering, merge or fold on its own line."""
    by_label: dict[str, list[Rewrite]] = defaultdict(list)
    lowered: dict[tuple[str, str], list[Rewrite]] = defaultdict(list)
    lines = []
    for rw in rewrites:
        if rw.kind == "quantized":
            by_label[rw.label].append(rw)
        elif rw.kind == "lowered":
            lowered[(rw.label, rw.op)].append(rw)
        else:
            lines.append(f"{rw.label}: {rw.target}")
    lowered_lines = []
    for (label, op), group in lowered.items():
        added, removed = sum(len(r.added_nodes) for r in group), sum(len(r.removed_nodes) for r in group)
        delta = f"+{_nodes(added)}" + (f", -{_nodes(removed)}" if removed else "")
        if len(group) == 1:
            lowered_lines.append(f"{label}: {op} {group[0].target} ({delta}){_stage(group)}")
        else:
            names = ", ".join(r.target for r in group[:3]) + (", ..." if len(group) > 3 else "")
            lowered_lines.append(f"{label}: {len(group)} {op} nodes ({names}; {delta}){_stage(group)}")
    lines = lowered_lines + lines
    head = []
    for label, group in by_label.items():
        nodes = sum(len(r.added_nodes) for r in group)
        inits = sum(len(r.added_initializers) for r in group)
        retyped = sum(len(r.changed_initializers) + len(r.removed_initializers) for r in group)
        only = sum(r.weight_only for r in group)
        kinds = [
            f"{len(group) - only} with fp8 activations" if len(group) > only else "",
            f"{only} weight-only" if only else "",
        ]
        dtype = group[0].weight_dtype or "fp8"
        detail = f"+{nodes} nodes, +{inits} initializers" + (f", {retyped} weights now {dtype}" if retyped else "")
        head.append(
            f"{label}: {len(group)} linear{'s' if len(group) > 1 else ''} "
            f"({', '.join(k for k in kinds if k)}); {detail}{_stage(group)}"
        )
        head += [f"  {quantized_line(r)}" for r in group]
    return head + lines


def node_line(e: NodeChange) -> str:
    why = f" (unmatched: {e.why})" if e.why else ""
    if e.kind == "added":
        return f"added    {e.op} {e.name_b}{why}"
    if e.kind == "removed":
        return f"removed  {e.op} {e.name_a}{why}"
    if e.kind == "renamed":
        return f"renamed  {e.op} {e.name_a} -> {e.name_b}"
    changes = "; ".join(_change(c.field, c.before, c.after) for c in e.changes)
    return f"changed  {e.op} {e.name_a or e.name_b}: {changes}"


def _change(field: str, before: str, after: str) -> str:
    if field == "name":
        return f"{before} -> {after}"
    return f"{field}: {before} -> {after}" if before else f"{field} {after}"  # "values differ"


def initializer_line(e: InitializerChange) -> str:
    name = e.name_a or e.name_b
    if e.kind in ("added", "removed"):
        return f"initializer {e.kind} {name}"
    parts = [_change(c.field, c.before, c.after) for c in e.changes]
    if e.max_abs_diff is not None:
        parts.append(f"max abs diff {e.max_abs_diff:.3g}")
    if e.stats_a and e.stats_b:
        a, b = e.stats_a, e.stats_b
        parts.append(
            f"mean {a.mean:.3g} -> {b.mean:.3g}, std {a.std:.3g} -> {b.std:.3g}, "
            f"absmax {a.absmax:.3g} -> {b.absmax:.3g}"
        )
    return f"initializer {e.kind} {name}: " + "; ".join(parts)


def _layer_title(layer: int | None) -> str:
    return f"layer {layer}" if layer is not None else "outside layers"


def numeric_lines(n: NumericReport) -> list[str]:
    if n.status == "skipped":
        return [f"numeric: skipped: {n.reason}"]
    inputs = ", ".join(f"{k}{v}" for k, v in n.inputs.items())
    lines = [f"numeric (seed {n.seed}; inputs {inputs}): {n.compared} tensors compared"]
    for e in n.layers:
        error = f"max rel err {e.max_rel:.3g} over {e.tensors} tensors (worst: {e.worst})" if e.max_rel else "exact"
        lines.append(f"  {_layer_title(e.layer)}: {error}" + ("" if e.max_rel else f" over {e.tensors} tensors"))
    lines += [f"  output {e.tensor}: max rel err {e.max_rel:.3g} (max abs {e.max_abs:.3g})" for e in n.outputs]
    j = n.first_jump
    lines.append(
        f"  first jump: {_layer_title(j.layer)}, {j.op} {j.node} -> {j.tensor}: max rel err {j.max_rel:.3g}"
        if j
        else "  first jump: none (no error above 1e-6 grows 10x)"
    )
    return lines


def graph_diff_lines(g: GraphDiff) -> list[str]:
    matched = ", ".join(f"{k} {v}" for k, v in g.matched.items())
    title = f"graph {g.role}" if g.role else "graph"
    lines = [
        f"{title} ({g.a} -> {g.b}): {g.nodes_a} -> {g.nodes_b} nodes, matched {sum(g.matched.values())}"
        f" ({matched or 'none'}); {g.differences or 'no'} differences"
    ]
    if g.stages:
        lines.append(f"  stages (from the passes' provenance marks): {', '.join(g.stages)}")
    if g.model:
        lines.append("  model:")
        lines += [f"    {c.field}: {c.before} -> {c.after}" for c in g.model]
    for layer in g.layers():
        rows = rewrite_lines([r for r in g.rewrites if r.layer == layer])
        rows += [node_line(e) for e in g.nodes if e.layer == layer]
        rows += [initializer_line(e) for e in g.initializers if e.layer == layer]
        if not rows:
            continue
        lines.append(f"  {_layer_title(layer)}:")
        lines += [f"    {r}" for r in rows[:PER_LAYER]]
        if len(rows) > PER_LAYER:
            lines.append(f"    ... {len(rows) - PER_LAYER} more (--format json lists all)")
    if g.numeric:
        lines += ["  " + x for x in numeric_lines(g.numeric)]
    return lines


def render_diff(report: DiffReport) -> str:
    lines = [f"diff {report.a} {report.b}"]
    if report.inputs != "seeded random":
        lines.append(f"numeric inputs: {report.inputs} (token ids; positions and any past cache made to match)")
    lines += [f"graph {r}: only in {report.a}" for r in report.only_a]
    lines += [f"graph {r}: only in {report.b}" for r in report.only_b]
    for g in report.graphs:
        lines += graph_diff_lines(g)
    if report.loss is not None:
        lines.append(report.loss.line())
    total = sum(g.differences for g in report.graphs) + len(report.only_a) + len(report.only_b)
    lines.append("no differences" if report.identical else f"{total} differences")
    return "\n".join(lines) + "\n"
