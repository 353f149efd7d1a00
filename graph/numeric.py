"""`dsv3c diff --numeric`: run both graphs on the same seeded inputs and compare every shared tensor.

Each graph runs with onnxruntime (onnxkit/session.py's setup: CPU, graph optimizations off so that every
node's output exists) on a copy whose intermediate tensors are all graph outputs. Tensors are paired by
name, or through the node matching when a matched node's outputs were renamed. The report gives the max
relative error per layer (max |a - b| / max |a|) and the first tensor, in A's order, whose error jumps past
10x the largest error before it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from dsv3c.errors import UserError
from dsv3c.graph.diff_types import LayerError, NumericReport, TensorError
from dsv3c.graph.index import GraphIndex, input_names, op_label, output_names
from dsv3c.graph.load import LoadedGraph, read_raw
from dsv3c.graph.match import Matching
from dsv3c.onnxkit.dtypes import numpy_dtype
from dsv3c.onnxkit.session import SessionSetup, import_ort, providers_for, session_options

JUMP = 10.0  # an error this many times the largest before it is a jump
FLOOR = 1e-6  # errors below this are float noise, never a jump
MAX_PROTO = 1_900_000_000  # protobuf's 2 GB limit, with room for the graph


@dataclass(frozen=True)
class _Pair:
    a: str
    b: str
    node: ir.Node  # producing node in A


def _dim_value(name: str) -> int:
    lower = name.lower()
    if "batch" in lower:
        return 1
    if "past" in lower or "cache" in lower:
        return 3
    return 4


def _vocab(g: LoadedGraph, index: GraphIndex, ids: str) -> int:
    for out in g.graph.outputs:
        dims = out.shape.dims if out.shape is not None else ()
        if "logits" in (out.name or "") and dims and isinstance(dims[-1], int):
            return int(dims[-1])
    for node, _ in index.uses(index.values.get(ids)):
        table = input_names(node)[0]
        if node.op_type == "Gather" and table in g.tensors:
            return g.tensors[table].shape[0]
    sizes = [t.shape[0] for n, t in g.tensors.items() if "embed" in n and t.shape]
    return max(sizes, default=2)


def make_inputs(
    graphs: list[tuple[LoadedGraph, GraphIndex]], seed: int, given: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Seeded inputs for the union of both graphs' inputs; the same name always gets the same array.

    `given` arrays (token ids of real text, say) are used as they are, and their shapes fix the symbolic
    dims they carry, so the other inputs (positions, a past cache) are made to match them."""
    feeds: dict[str, np.ndarray] = {}
    dims: dict[str, int] = {}
    for g, _ in graphs:
        for v in g.graph.inputs:
            if given and v.name in given and v.shape is not None:
                for d, size in zip(v.shape.dims, given[v.name].shape, strict=False):
                    if not isinstance(d, int):
                        dims.setdefault(d.value or "", int(size))
    feeds.update({k: v for k, v in (given or {}).items() if any(k in index.inputs for _, index in graphs)})
    for g, index in graphs:
        specs = [v for v in g.graph.inputs if v.name in index.inputs]
        past = next(
            (
                dims.setdefault(symbol, _dim_value(symbol))
                for v in specs
                for symbol in _symbols(v)
                if "past" in symbol.lower()
            ),
            0,
        )
        for v in specs:
            name = v.name or ""
            if name in feeds:
                continue
            shape = [
                d if isinstance(d, int) else dims.setdefault(d.value or "", _dim_value(d.value or ""))
                for d in (v.shape.dims if v.shape is not None else ())
            ]
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            dtype = numpy_dtype(int(v.dtype) if v.dtype is not None else 0) or np.dtype(np.float32)
            lower = name.lower()
            if dtype.kind in "iu" and "position" in lower:
                value = np.broadcast_to(past + np.arange(shape[-1] if shape else 1), shape).astype(dtype)
            elif dtype.kind in "iu" and ("id" in lower or "token" in lower):
                value = rng.integers(0, _vocab(g, index, name), size=shape).astype(dtype)
            elif dtype.kind in "iu":
                value = np.zeros(shape, dtype)
            elif dtype.kind == "b":
                value = np.ones(shape, dtype)
            else:
                value = rng.standard_normal(shape).astype(dtype)
            feeds[name] = value
    return feeds


def _symbols(v: ir.Value) -> list[str]:
    """The names of a value's symbolic dims ("" for an unnamed one)."""
    return [d.value or "" for d in (v.shape.dims if v.shape is not None else ()) if not isinstance(d, int)]


def _pairs(a: GraphIndex, b: GraphIndex, m: Matching) -> list[_Pair]:
    pairs = []
    for node in a.nodes:
        partner = m.a_to_b.get(node)
        outputs_b = output_names(partner) if partner is not None else []
        for k, name in enumerate(output_names(node)):
            if not name:
                continue
            if b.made(name) is not None:
                pairs.append(_Pair(name, name, node))
            elif k < len(outputs_b) and outputs_b[k]:
                pairs.append(_Pair(name, outputs_b[k], node))
    return pairs


def _runnable(g: LoadedGraph, extra_outputs: list[str]) -> bytes:
    """The model with external data read in and `extra_outputs` added as graph outputs, serialized."""
    if sum(t.nbytes for t in g.tensors.values()) > MAX_PROTO:
        raise ValueError("weights over 2 GB; numeric comparison reads models into one protobuf")
    model = ir.serde.serialize_model(g.model)
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            t.raw_data = read_raw(g, t.name)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(extra_outputs) if n not in have)
    return model.SerializeToString()


def _run(g: LoadedGraph, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # onnxkit's one session setup, graph optimizations off so that every node's output exists; the session is
    # built here rather than by open_session so that a failure keeps onnxruntime's own first line
    setup = SessionSetup(optimization="none")
    session = import_ort().InferenceSession(
        _runnable(g, names), session_options(setup), providers=providers_for(setup.device)
    )
    wanted = [o.name for o in session.get_outputs()]
    own = {i.name for i in session.get_inputs()}
    values = session.run(wanted, {k: v for k, v in feeds.items() if k in own})
    return dict(zip(wanted, values, strict=True))


def _error(a: GraphIndex, pair: _Pair, x: np.ndarray, y: np.ndarray) -> TensorError | None:
    if x.shape != y.shape or x.dtype.kind != "f" or y.dtype.kind != "f":
        return None
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    diff = float(np.max(np.abs(x64 - y64))) if x.size else 0.0
    ref = float(np.max(np.abs(x64))) if x.size else 0.0
    rel = diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf"))
    node = pair.node
    return TensorError(pair.a, a.label(node), op_label(node), a.layer(node), diff, rel)


def _summarize(errors: list[TensorError], outputs: set[str], report: NumericReport) -> None:
    layers: dict[int | None, LayerError] = {}
    worst_so_far = 0.0
    for e in errors:
        row = layers.setdefault(e.layer, LayerError(e.layer, 0.0, 0, ""))
        row.tensors += 1
        if e.max_rel > row.max_rel or not row.worst:
            row.max_rel, row.worst = e.max_rel, e.tensor
        if report.first_jump is None and e.max_rel > FLOOR and e.max_rel > JUMP * worst_so_far:
            report.first_jump = e
        worst_so_far = max(worst_so_far, e.max_rel)
    report.layers = sorted(layers.values(), key=lambda r: (r.layer is None, r.layer or 0))
    report.outputs = [e for e in errors if e.tensor in outputs]
    report.worst = sorted(errors, key=lambda e: -e.max_rel)[:10]
    report.compared = len(errors)


def compare_numeric(
    a: LoadedGraph, b: LoadedGraph, m: Matching, seed: int = 0, given: dict[str, np.ndarray] | None = None
) -> NumericReport:
    """Run A and B on the same inputs and compare the tensors both produce; "skipped" (why) if one cannot run.
    `given`: inputs by name to use as they are (make_inputs), e.g. the token ids of real text."""
    for g in (a, b):
        missing = [t.name for t in g.tensors.values() if t.data == "missing"]
        if missing:
            return NumericReport(
                "skipped",
                f"{g.path.name} has no data for {len(missing)} initializers "
                f"(e.g. {missing[0]}; a --weights none export?)",
                seed,
            )
    try:
        import_ort()
    except UserError:
        return NumericReport("skipped", "onnxruntime is not installed", seed)
    ia, ib = GraphIndex(a.graph), GraphIndex(b.graph)
    pairs = _pairs(ia, ib, m)
    feeds = make_inputs([(a, ia), (b, ib)], seed, given)
    values = []
    for g, names in ((a, [p.a for p in pairs]), (b, [p.b for p in pairs])):
        try:
            values.append(_run(g, names, feeds))
        except Exception as e:  # onnxruntime raises its own types; any failure means "cannot run"
            return NumericReport("skipped", f"cannot run {g.path.name}: {str(e).strip().splitlines()[0][:300]}", seed)
    va, vb = values
    report = NumericReport("ok", "", seed, {k: list(v.shape) for k, v in feeds.items()})
    errors = [err for p in pairs if p.a in va and p.b in vb and (err := _error(ia, p, va[p.a], vb[p.b])) is not None]
    _summarize(errors, {o.name or "" for o in a.graph.outputs}, report)
    return report
