"""`dsv3c quantize --report`: how far quantized graphs move from the unquantized one, per layer.

Each graph of the reference export and of every candidate export runs on the same seeded random inputs.
Per layer, the residual stream leaving the layer (the input of the next RMSNorm) is compared; per graph,
the logits; overall, all graphs' logits together. Error = ||candidate - reference|| / ||reference|| over the
whole tensor, and the same per token (each vector along the last axis) with its median: on MoE models a
few tokens whose expert choice flips dominate the first number, the median shows the typical token.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
from dsv3c.artifact.manifest import read_manifest
from dsv3c.passes.ort_run import FeedShape, GraphRunner, load_graph, random_feeds, relative_error

_NORMS = (
    (re.compile(r"^model\.layers\.(\d+)\.input_layernorm\.weight$"), lambda i: f"layers.{i - 1}" if i else None),
    (re.compile(r"^mtp\.(\d+)\.shared_head\.norm\.weight$"), lambda i: f"mtp.{i}"),
)
_FINAL_NORM = "model.norm.weight"
OUTPUT = "logits"


@dataclass(frozen=True)
class ErrorRow:
    graph: str  # prefill, decode, mtp, or "all"
    tensor: str  # layers.{i}, mtp.{k}, logits
    errors: dict[str, float]  # scheme -> relative error over the whole tensor
    median_token: dict[str, float] = field(default_factory=dict)  # scheme -> median per-token relative error


@dataclass
class QuantReport:
    schemes: list[str]
    rows: list[ErrorRow] = field(default_factory=list)

    def error(self, graph: str, tensor: str, scheme: str) -> float:
        return next(r.errors[scheme] for r in self.rows if r.graph == graph and r.tensor == tensor)


def _norm_input(weight: ir.Value) -> str | None:
    """The x of RMSNorm(x) = weight * x * rsqrt(mean(x^2) + eps): the Pow(x, 2) input upstream of weight's Mul."""
    for use in weight.uses():
        near = {v for n in _producers(use.node) for v in n.inputs} | set(use.node.inputs)  # x * rsqrt(...) reads x
        todo, seen = collections.deque([use.node]), {use.node}
        while todo and len(seen) < 64:  # breadth first: the norm's own Pow is a few nodes up
            node = todo.popleft()
            if node.op_type == "Pow" and node.inputs[0] is not None and node.inputs[0] in near:
                return node.inputs[0].name
            for producer in _producers(node):
                if producer not in seen:
                    seen.add(producer)
                    todo.append(producer)
    return None


def _producers(node: ir.Node) -> list[ir.Node]:
    return [p for v in node.inputs if v is not None and (p := v.producer()) is not None]


def layer_probes(model: ir.Model) -> list[tuple[str, str]]:
    """(label, tensor name) of the residual stream after each layer, in layer order."""
    found: list[tuple[str, str]] = []
    last = -1
    for name, value in model.graph.initializers.items():
        for pattern, label_of in _NORMS:
            m = pattern.match(name)
            if m is None:
                continue
            index = int(m[1])
            if pattern.pattern.startswith("^model"):
                last = max(last, index)
            label, tensor = label_of(index), _norm_input(value)
            if label is not None and tensor is not None:
                found.append((label, tensor))
    final = model.graph.initializers.get(_FINAL_NORM)
    tensor = _norm_input(final) if final is not None else None
    if tensor is not None and last >= 0:
        found.append((f"layers.{last}", tensor))
    return sorted(found, key=lambda p: (p[0].split(".")[0], int(p[0].split(".")[1])))


def compare_exports(
    reference: Path,
    candidates: dict[str, Path],
    seed: int = 0,
    batches: int = 2,
    shape: FeedShape | None = None,
    text: Sequence[np.ndarray] | None = None,
) -> QuantReport:
    """Errors of each candidate export against `reference`, per graph and layer; on seeded random inputs,
    or with `text` (token windows [B, S] per batch) on real text, each graph fed as in generation
    (calibrate.text_feeds: decode and MTP module 0 continue the reference's prefill, module d its module d-1)."""
    from dsv3c.passes.calibrate import chain_order, feeds_from, text_feeds

    manifest = read_manifest(reference)
    report = QuantReport(list(candidates))
    all_logits: dict[str, list[np.ndarray]] = {s: [] for s in ["reference", *candidates]}
    reference_out: dict[str, list[dict[str, np.ndarray]]] = {}  # per role and batch: what later graphs read
    for role in chain_order(manifest.graphs):
        file = manifest.graphs[role]
        if file is None:
            continue
        ref_model = load_graph(reference, role)
        probes = layer_probes(ref_model)
        names = [t for _, t in probes]
        runners = {"reference": GraphRunner(ref_model, reference, names)}
        runners |= {s: GraphRunner(load_graph(folder, role), folder, names) for s, folder in candidates.items()}
        rng = np.random.default_rng(seed)
        outputs: dict[str, list[dict[str, np.ndarray]]] = {s: [] for s in runners}
        for b in range(batches if text is None else len(text)):
            if text is None:
                feeds = random_feeds(manifest, role, rng, shape or FeedShape())
            else:
                source = feeds_from(role)
                feeds = text_feeds(manifest, role, text[b], {} if source is None else reference_out[source][b])
            for s, runner in runners.items():
                outputs[s].append(runner.run(feeds))
        reference_out[role] = outputs["reference"]
        for label, tensor in [*probes, (OUTPUT, OUTPUT)]:
            ref = _tokens([o[tensor] for o in outputs["reference"]])
            cands = {s: _tokens([o[tensor] for o in outputs[s]]) for s in candidates}
            report.rows.append(_row(role, label, ref, cands))
        for s in all_logits:
            all_logits[s].extend(o[OUTPUT].reshape(-1, o[OUTPUT].shape[-1]) for o in outputs[s])
    ref_all = np.concatenate(all_logits["reference"])
    report.rows.append(_row("all", OUTPUT, ref_all, {s: np.concatenate(all_logits[s]) for s in candidates}))
    return report


def _tokens(arrays: list[np.ndarray]) -> np.ndarray:
    """Outputs of several batches as one [tokens, width] array."""
    return np.concatenate([a.reshape(-1, a.shape[-1]) for a in arrays])


def _row(graph: str, tensor: str, ref: np.ndarray, candidates: dict[str, np.ndarray]) -> ErrorRow:
    errors = {s: relative_error(c.ravel(), ref.ravel()) for s, c in candidates.items()}
    ref_norms = np.maximum(np.linalg.norm(ref.astype(np.float64), axis=-1), np.finfo(np.float64).tiny)
    median = {
        s: float(np.median(np.linalg.norm((c - ref).astype(np.float64), axis=-1) / ref_norms))
        for s, c in candidates.items()
    }
    return ErrorRow(graph, tensor, errors, median)


def format_report(report: QuantReport, title: str = "relative error vs the unquantized graph") -> str:
    schemes: Sequence[str] = report.schemes
    width = max(12, *(len(s) for s in schemes))
    header = " ".join(f"{s:>{width}} {'(median tok)':>12}" for s in schemes)
    lines = [title + " (whole tensor, and the median token)", f"{'graph':<8} {'tensor':<10} " + header]
    for row in report.rows:
        cells = " ".join(f"{row.errors[s]:>{width}.3e} {row.median_token.get(s, float('nan')):>12.3e}" for s in schemes)
        lines.append(f"{row.graph:<8} {row.tensor:<10} " + cells)
    return "\n".join(lines)
