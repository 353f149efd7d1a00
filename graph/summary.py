"""`dsv3c inspect` on an ONNX file or an export folder: what a graph holds, read from the protos alone."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.graph.index import GraphIndex, attribute_text, is_custom, op_label
from dsv3c.graph.load import MANIFEST, ExternalFile, LoadedGraph, load_graph, read_export_manifest
from dsv3c.graph.marks import Marks
from dsv3c.onnxkit.dtypes import dtype_name
from dsv3c.onnxkit.linears import find_linears

_CACHE_NAME = re.compile(r"cache|past|ckv|kpe|latent", re.IGNORECASE)


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class DtypeRow:
    dtype: str
    tensors: int
    parameters: int
    bytes: int
    without_data: int


@dataclass
class CustomNodes:
    """Custom nodes of one op with identical attributes."""

    op: str
    count: int
    attributes: dict[str, str]
    layers: list[int]
    names: list[str]


@dataclass
class Fp8Coverage:
    linears: int
    fp8_linears: int  # weights and activations in fp8
    weight_only: int  # fp8 weights, activations in high precision
    flops: float  # per token, over all linears
    fp8_flops: float
    schemes: dict[str, int]  # "fp8, block 128" -> linears with fp8 weights
    weight_only_flops: float = 0.0  # fp8 weights whose activations stay high precision
    activations: dict[str, int] = field(default_factory=dict)  # "fp8, 1x128 tiles (online)" -> linears

    @property
    def share(self) -> float:
        return self.fp8_flops / self.flops if self.flops else 0.0

    @property
    def weight_only_share(self) -> float:
        return self.weight_only_flops / self.flops if self.flops else 0.0


@dataclass
class GraphSummary:
    role: str
    path: str
    ir_version: int
    opsets: dict[str, int]
    producer: str
    nodes: int
    ops: dict[str, int]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: int
    bytes: int
    by_dtype: list[DtypeRow]
    data: str  # "present", "missing", "partial (n of m tensors)"
    custom_nodes: list[CustomNodes]
    functions: dict[str, int]  # "dsv3c::MoE" -> nodes in its body
    fp8: Fp8Coverage
    cache: list[TensorSpec]
    external_files: list[ExternalFile]
    # provenance: the stages dsv3c ran (in order) -> nodes they left in the graph, read from the marks
    stages: dict[str, int] = field(default_factory=dict)


@dataclass
class InspectReport:
    path: str
    kind: str  # "onnx model" | "export folder"
    graphs: list[GraphSummary] = field(default_factory=list)
    cache_layout: dict[str, object] | None = None  # from an export folder's manifest


def _spec(v: ir.Value) -> TensorSpec:
    dims: list[int | str] = [
        d if isinstance(d, int) else d.value or "?" for d in (v.shape.dims if v.shape is not None else ())
    ]
    return TensorSpec(v.name or "", dtype_name(int(v.dtype) if v.dtype is not None else 0), dims)


def function_label(f: ir.Function) -> str:
    return f"{f.domain}::{f.name}" + (f" ({f.overload})" if f.overload else "")


def _custom(index: GraphIndex) -> list[CustomNodes]:
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], CustomNodes] = {}
    for node in index.nodes:
        if not is_custom(node):
            continue
        attrs = tuple(sorted((k, attribute_text(a)) for k, a in node.attributes.items()))
        group = groups.setdefault((op_label(node), attrs), CustomNodes(op_label(node), 0, dict(attrs), [], []))
        group.count += 1
        group.names.append(index.label(node))
        layer = index.layer(node)
        if layer is not None:
            group.layers.append(layer)
    return list(groups.values())


def _coverage(index: GraphIndex) -> Fp8Coverage:
    """Linears run in fp8 when both the weight and the activation are fp8 (onnxkit/linears.py says how each is
    found); fp8 weights next to a high-precision activation (a custom node's, a MoE's experts) are weight-only."""
    linears = find_linears(index.graph)
    schemes = Counter(lin.scheme for lin in linears if lin.fp8_weight)
    weight_only = [lin for lin in linears if lin.fp8_weight and not lin.fp8_activation]
    return Fp8Coverage(
        len(linears),
        sum(lin.runs_fp8 for lin in linears),
        len(weight_only),
        sum(lin.flops for lin in linears),
        sum(lin.flops for lin in linears if lin.runs_fp8),
        dict(schemes),
        sum(lin.flops for lin in weight_only),
        dict(Counter(lin.activation for lin in linears if lin.runs_fp8)),
    )


def _stages(g: LoadedGraph, index: GraphIndex) -> dict[str, int]:
    ran = g.model.metadata_props.get(provenance.MODEL_STAGES, "")
    counts = Counter(m.stage or "" for m in Marks(index).of.values())
    return {stage: counts[stage] for stage in [*dict.fromkeys(s for s in ran.split("\n") if s), *counts]}


def summarize(g: LoadedGraph) -> GraphSummary:
    index = GraphIndex(g.graph)
    rows: dict[str, DtypeRow] = {}
    for t in g.tensors.values():
        row = rows.setdefault(t.dtype, DtypeRow(t.dtype, 0, 0, 0, 0))
        row.tensors += 1
        row.parameters += t.numel
        row.bytes += t.nbytes
        row.without_data += t.data == "missing"
    missing = sum(r.without_data for r in rows.values())
    data = (
        "present"
        if not missing
        else "missing"
        if missing == len(g.tensors)
        else f"partial ({missing} of {len(g.tensors)} tensors missing)"
    )
    inputs = [_spec(v) for v in g.graph.inputs if v.name not in g.tensors]
    model = g.model
    return GraphSummary(
        role=g.role,
        path=str(g.path),
        ir_version=model.ir_version,
        opsets={d or "ai.onnx": v for d, v in model.opset_imports.items()},
        producer=f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        nodes=len(index),
        ops=dict(Counter(op_label(n) for n in index.nodes).most_common()),
        inputs=inputs,
        outputs=[_spec(v) for v in g.graph.outputs],
        parameters=sum(r.parameters for r in rows.values()),
        bytes=sum(r.bytes for r in rows.values()),
        by_dtype=sorted(rows.values(), key=lambda r: -r.bytes),
        data=data,
        custom_nodes=_custom(index),
        functions={function_label(f): len(f) for f in model.functions.values()},
        fp8=_coverage(index),
        cache=[s for s in inputs if _CACHE_NAME.search(s.name)],
        external_files=g.external_files,
        stages=_stages(g, index),
    )


def inspect_path(path: Path) -> InspectReport:
    """Summaries of one .onnx file, or of every graph an export folder's manifest names."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        roles, cache = read_export_manifest(path)
        report = InspectReport(str(path), "export folder", cache_layout=cache)
        report.graphs = [summarize(load_graph(p, role)) for role, p in roles.items()]
        return report
    return InspectReport(str(path), "onnx model", [summarize(load_graph(path))])
