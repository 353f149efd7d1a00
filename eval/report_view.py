"""The trained-model view of `quantize --report`: its measures on real text, and what they cost in loss.

The per-layer errors come from passes/report.py (on seeded random inputs, or fed with token windows of the
text); the loss delta is dsv3c eval's measure (eval/metrics.py) of each candidate export against the
unquantized export, both run in onnxruntime on the same windows. One `ReportView` renders as text, JSON or
a self-contained HTML page. Error growth is a layer's error over the previous layer's: how much each layer
adds to what it inherits (above 1: the layer amplifies).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np
from dsv3c.eval.calibration import WINDOWS_PER_BATCH
from dsv3c.eval.metrics import EvalResult, evaluate_many
from dsv3c.eval.scorer import open_scorer
from dsv3c.passes.report import QuantReport, format_report

REPORT_BATCHES = 4  # of WINDOWS_PER_BATCH windows of WINDOW tokens: 1,024 tokens


def report_batches(export_dir: Path, data: Path) -> list[np.ndarray]:
    from dsv3c.eval.calibration import calibration_batches

    return calibration_batches(export_dir, data, REPORT_BATCHES)


def loss_results(reference: Path, candidates: dict[str, Path], batches: list[np.ndarray]) -> dict[str, EvalResult]:
    """Each candidate's loss on the windows, compared with the reference export's."""
    windows = np.concatenate(batches)
    scorers = [open_scorer(f) for f in candidates.values()]
    results = evaluate_many(scorers, windows, WINDOWS_PER_BATCH, open_scorer(reference))
    return dict(zip(candidates, results, strict=True))


@dataclass
class ReportView:
    report: QuantReport
    inputs: str  # "text" or "random"
    losses: dict[str, EvalResult] = field(default_factory=dict)  # empty on random inputs: no loss to measure
    record: dict[str, object] = field(default_factory=dict)  # command, commit, machine (eval/record.py)

    def growth(self) -> dict[tuple[str, str], dict[str, float]]:
        """(graph, layers.i) -> scheme -> error of layer i / error of layer i-1, for i > 0."""
        out: dict[tuple[str, str], dict[str, float]] = {}
        previous: dict[str, dict[str, float]] = {}
        for row in self.report.rows:
            if not row.tensor.startswith("layers."):
                continue
            before = previous.get(row.graph)
            if before is not None:
                out[(row.graph, row.tensor)] = {s: _ratio(row.errors[s], before[s]) for s in self.report.schemes}
            previous[row.graph] = row.errors
        return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf if a > 0 else 1.0


def render_text(view: ReportView) -> str:
    title = "relative error on the text" if view.inputs == "text" else "relative error vs the unquantized graph"
    lines = [format_report(view.report, title)]
    if view.losses:
        first = next(iter(view.losses.values()))
        lines.append(f"loss on the text ({first.windows} windows of {first.window} tokens) vs the unquantized graph")
        for name, r in view.losses.items():
            assert r.comparison is not None
            c = r.comparison
            lines.append(
                f"  {name:<16} loss {r.loss:.5f} (reference {c.reference_loss:.5f}): relative "
                f"{c.rel_loss_error:+.3e}, top-1 agreement {c.top1_agreement:.2%}, KL {c.kl_mean:.3e} nats/token"
            )
    return "\n".join(lines) + "\n"


def to_dict(view: ReportView) -> dict[str, object]:
    growth = view.growth()
    rows = [
        {
            "graph": r.graph,
            "tensor": r.tensor,
            "error": r.errors,
            "median_token_error": r.median_token,
            "growth": growth.get((r.graph, r.tensor)),
        }
        for r in view.report.rows
    ]
    losses = {
        name: {"loss": r.loss, "tokens": r.tokens, **({} if r.comparison is None else vars(r.comparison))}
        for name, r in view.losses.items()
    }
    data = {"inputs": view.inputs, "schemes": view.report.schemes, "rows": rows, "loss": losses or None}
    return {**view.record, **data}


def render_json(view: ReportView) -> str:
    # inf/nan are not JSON: a zero reference error makes growth infinite, written as null
    def clean(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(to_dict(view)), indent=1) + "\n"


_CSS = (
    "body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1000px;color:#1d1f23;padding:0 1em}"
    "table{border-collapse:collapse;margin:.6em 0}td,th{padding:.15em .6em;text-align:right;"
    "font-family:ui-monospace,monospace;font-size:12.5px}th{border-bottom:1px solid #99a}"
    "td.name{text-align:left}tr.up td.g{color:#a3280f}svg text{font:10px system-ui,sans-serif;fill:#445}"
    "svg .axis{stroke:#99a}"
)
_COLORS = ("#5b7fc7", "#d0602c", "#3c9a5f", "#8d5bc7")


def _chart(view: ReportView, graph: str) -> str:
    """Per-layer error of each scheme on a log scale (inline SVG): the growth through the layers."""
    rows = [r for r in view.report.rows if r.graph == graph and r.tensor.startswith("layers.")]
    values = [v for r in rows for v in r.errors.values() if v > 0]
    if len(rows) < 2 or not values:
        return ""
    lo, hi = math.log10(min(values)), math.log10(max(values))
    span = max(hi - lo, 1e-9)
    w, h, pad = 560, 160, 36

    def point(i: int, v: float) -> str:
        x = pad + i * (w - 2 * pad) / (len(rows) - 1)
        y = h - pad - (math.log10(max(v, 10**lo)) - lo) / span * (h - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg width="{w}" height="{h}" role="img" aria-label="error per layer, {escape(graph)}">']
    parts.append(f'<line class="axis" x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}"/>')
    parts.append(f'<text x="2" y="{pad}">{10**hi:.1e}</text><text x="2" y="{h - pad}">{10**lo:.1e}</text>')
    for k, scheme in enumerate(view.report.schemes):
        line = " ".join(point(i, r.errors[scheme]) for i, r in enumerate(rows))
        color = _COLORS[k % len(_COLORS)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{line}"/>')
        parts.append(f'<text x="{w - pad + 4}" y="{14 + 12 * k}" fill="{color}">{escape(scheme)}</text>')
    parts.append(f'<text x="{pad}" y="{h - 8}">{escape(rows[0].tensor)}</text>')
    parts.append(f'<text x="{w - pad - 50}" y="{h - 8}">{escape(rows[-1].tensor)}</text></svg>')
    return "".join(parts)


def render_html(view: ReportView, title: str = "dsv3c quantize --report") -> str:
    schemes = view.report.schemes
    growth = view.growth()
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"]
    out.append(f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>")
    inputs = "token windows of the given text" if view.inputs == "text" else "seeded random token ids"
    out.append(f"<p>Relative error against the unquantized export, on {inputs}.</p>")
    if view.losses:
        out.append("<h2>Loss on the text</h2><table><tr><th>candidate</th><th>loss</th><th>reference</th>")
        out.append("<th>relative</th><th>top-1 agreement</th><th>KL (nats/token)</th></tr>")
        for name, result in view.losses.items():
            c = result.comparison
            assert c is not None
            out.append(
                f"<tr><td class='name'>{escape(name)}</td><td>{result.loss:.5f}</td><td>{c.reference_loss:.5f}</td>"
                f"<td>{c.rel_loss_error:+.3e}</td><td>{c.top1_agreement:.2%}</td><td>{c.kl_mean:.3e}</td></tr>"
            )
        out.append("</table>")
    for graph in dict.fromkeys(r.graph for r in view.report.rows):
        out.append(f"<h2>{escape(graph)}</h2>{_chart(view, graph)}<table><tr><th>tensor</th>")
        out.append("".join(f"<th>{escape(s)}</th><th>median token</th><th>growth</th>" for s in schemes) + "</tr>")
        for r in (r for r in view.report.rows if r.graph == graph):
            g = growth.get((r.graph, r.tensor), {})
            up = any(v > 1 for v in g.values())
            cells = "".join(
                f"<td>{r.errors[s]:.3e}</td><td>{r.median_token.get(s, math.nan):.3e}</td>"
                f"<td class='g'>{'' if s not in g else f'{g[s]:.2f}x'}</td>"
                for s in schemes
            )
            out.append(f"<tr class='{'up' if up else ''}'><td class='name'>{escape(r.tensor)}</td>{cells}</tr>")
        out.append("</table>")
    out.append("</body></html>\n")
    return "".join(out)


def render(view: ReportView, fmt: str) -> str:
    return {"text": render_text, "json": render_json, "html": render_html}[fmt](view)  # cmd_quantize's choices
