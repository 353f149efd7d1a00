"""`dsv3c diff --format html`: one self-contained file (inline CSS, JS and SVG; nothing fetched).

Each graph gets a per-layer chart (max relative error with --numeric, else the number of differences,
log scale, inline SVG) and one collapsible <details> per layer with its rewrites, nodes and initializers.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

from dsv3c.graph.diff_types import DiffReport, GraphDiff
from dsv3c.graph.render_text import initializer_line, node_line, numeric_lines, rewrite_lines

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#1d1f23;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccd}
code,li,pre{font-family:ui-monospace,Menlo,monospace;font-size:12.5px}pre{white-space:pre-wrap}
.same{color:#17692f}.differ{color:#a3280f}.verdict{font-weight:600;font-size:1.1em}
details{border:1px solid #dde;border-radius:6px;margin:.35em 0;padding:.2em .6em;background:#fbfbfd}
summary{cursor:pointer;font-weight:600}summary .tag{font-weight:400;color:#556;margin-left:.6em}
ul{margin:.3em 0 .5em;padding-left:1.2em}li{margin:.1em 0;white-space:pre-wrap}
li.rewrite{color:#234e9a}li.added{color:#17692f}li.removed{color:#a3280f}
.toolbar{margin:.8em 0}.toolbar button,.toolbar input{font:inherit;margin-right:.4em}
svg .bar{fill:#5b7fc7}svg .jump{fill:#d0602c}svg text{font:10px system-ui,sans-serif;fill:#445}
svg .axis{stroke:#99a;stroke-width:1}.hidden{display:none}
"""

_JS = """
(function(){
  var all=document.querySelectorAll('details.layer');
  document.getElementById('expand').onclick=function(){all.forEach(function(d){d.open=true;});};
  document.getElementById('collapse').onclick=function(){all.forEach(function(d){d.open=false;});};
  var filter=document.getElementById('filter');
  filter.oninput=function(){
    var q=filter.value.toLowerCase();
    all.forEach(function(d){var hit=!q||d.textContent.toLowerCase().indexOf(q)>=0;d.classList.toggle('hidden',!hit);
      if(q&&hit){d.open=true;}});
  };
  document.querySelectorAll('svg .bar').forEach(function(bar){
    bar.addEventListener('click',function(){var d=document.getElementById(bar.getAttribute('data-target'));
      if(d){d.open=true;d.scrollIntoView();}});
  });
  document.getElementById('status').textContent='rendered: '+document.querySelectorAll('section.graph').length+
    ' graphs, '+all.length+' layers, '+document.querySelectorAll('svg .bar').length+' bars';
})();
"""


def _chart(g: GraphDiff, anchor: str) -> str:
    """Bars per layer on a log scale: numeric max relative error if measured, else the count of differences."""
    numeric = g.numeric is not None and g.numeric.status == "ok"
    if numeric and g.numeric:
        jump = g.numeric.first_jump.layer if g.numeric.first_jump else "none"
        values = [(e.layer, e.max_rel, e.layer == jump) for e in g.numeric.layers]
        title = "max relative error per layer (log scale)"
    else:
        counts: dict[int | None, int] = {}
        for e in g.entries():
            counts[e.layer] = counts.get(e.layer, 0) + 1
        values = [(layer, float(counts.get(layer, 0)), False) for layer in g.layers()]
        title = "differences per layer (log scale)"
    if not values:
        return ""
    logs = [math.log10(v) for _, v, _ in values if v > 0]
    top, bottom = (math.ceil(max(logs) + 0.01), math.floor(min(logs) - 0.01)) if logs else (1, 0)
    step = min(36.0, max(6.0, 900 / len(values)))
    width, height, pad = int(max(320, step * len(values) + 60)), 180, 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 30}" role="img" '
        f'aria-label="{escape(title)}"><text x="{pad}" y="12">{escape(title)}</text>',
        f'<line class="axis" x1="{pad}" y1="{height}" x2="{width - 10}" y2="{height}"/>',
        f'<text x="2" y="24">1e{top}</text><text x="2" y="{height}">1e{bottom}</text>',
    ]
    if numeric:
        parts.append(
            f'<rect class="swatch jump" x="{pad + 300}" y="4" width="9" height="9"/>'
            f'<text x="{pad + 313}" y="12">first jump</text>'
        )
    for k, (layer, value, jump) in enumerate(values):
        frac = (math.log10(value) - bottom) / (top - bottom) if value > 0 and top > bottom else 0.0
        h = max(1.0, frac * (height - 24))
        x = pad + k * step
        name = "outside layers" if layer is None else f"layer {layer}"
        target = f"{anchor}-layer-{'none' if layer is None else layer}"
        parts.append(
            f'<rect class="bar{" jump" if jump else ""}" data-layer="{escape(str(layer))}" '
            f'data-target="{target}" x="{x:.1f}" y="{height - h:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{h:.1f}"><title>{escape(name)}: {value:.3g}</title></rect>'
        )
        if len(values) <= 40 or k % 5 == 0:
            parts.append(f'<text x="{x:.1f}" y="{height + 12}">{"-" if layer is None else layer}</text>')
    parts.append("</svg>")
    return f'<figure class="chart">{"".join(parts)}</figure>'


def _layer_details(g: GraphDiff, anchor: str) -> list[str]:
    errors = {e.layer: e for e in g.numeric.layers} if g.numeric else {}
    out = []
    for layer in g.layers():
        rows = [("rewrite", x) for x in rewrite_lines([r for r in g.rewrites if r.layer == layer])]
        rows += [(e.kind, node_line(e)) for e in g.nodes if e.layer == layer]
        rows += [(e.kind, initializer_line(e)) for e in g.initializers if e.layer == layer]
        n = sum(e.layer == layer for e in g.entries())
        tags = [f"{n} difference{'s' if n > 1 else ''}"] if n else []
        if layer in errors:
            tags.append(f"max rel err {errors[layer].max_rel:.3g}")
        name = "outside layers" if layer is None else f"layer {layer}"
        items = (
            "".join(f'<li class="{kind}">{escape(text)}</li>' for kind, text in rows)
            or "<li>no structural differences</li>"
        )
        out.append(
            f'<details class="layer" id="{anchor}-layer-{"none" if layer is None else layer}">'
            f'<summary>{escape(name)}<span class="tag">{escape(" · ".join(tags))}</span></summary>'
            f"<ul>{items}</ul></details>"
        )
    return out


def _graph(g: GraphDiff, k: int) -> str:
    anchor = f"g{k}"
    matched = ", ".join(f"{m} {n}" for m, n in g.matched.items()) or "none"
    parts = [
        f'<section class="graph" data-role="{escape(g.role)}"><h2>graph {escape(g.role or Path(g.b).name)}</h2>',
        f"<p><code>{escape(g.a)}</code> → <code>{escape(g.b)}</code>: {g.nodes_a} → {g.nodes_b} nodes, "
        f"matched {sum(g.matched.values())} ({escape(matched)}); "
        f"{g.differences or 'no'} differences</p>",
    ]
    if g.stages:
        parts.append(f"<p>stages (from the passes' provenance marks): {escape(', '.join(g.stages))}</p>")
    if g.model:
        items = "".join(f"<li>{escape(f'{c.field}: {c.before} -> {c.after}')}</li>" for c in g.model)
        parts.append(f"<h3>model</h3><ul>{items}</ul>")
    parts.append(_chart(g, anchor))
    parts += _layer_details(g, anchor)
    if g.numeric:
        parts.append("<h3>numeric</h3><pre>" + escape("\n".join(numeric_lines(g.numeric))) + "</pre>")
    parts.append("</section>")
    return "".join(parts)


def render_html(report: DiffReport) -> str:
    total = sum(g.differences for g in report.graphs) + len(report.only_a) + len(report.only_b)
    verdict = "no differences" if report.identical else f"{total} differences"
    only = [
        f"<li>graph {escape(r)}: only in {escape(side)}</li>"
        for side, roles in ((report.a, report.only_a), (report.b, report.only_b))
        for r in roles
    ]
    return "".join(
        [
            '<!doctype html><html lang="en"><head><meta charset="utf-8">',
            f"<title>dsv3c diff: {escape(verdict)}</title><style>{_CSS}</style></head><body>",
            f"<h1>dsv3c diff</h1><p>A: <code>{escape(report.a)}</code><br>B: <code>{escape(report.b)}</code></p>",
            f'<p class="verdict {"same" if report.identical else "differ"}" id="verdict">{escape(verdict)}</p>',
            f"<ul>{''.join(only)}</ul>" if only else "",
            f'<p id="loss">{escape(report.loss.line())}</p>' if report.loss is not None else "",
            '<div class="toolbar"><button id="expand">expand all</button><button id="collapse">collapse all</button>'
            '<input id="filter" placeholder="filter layers"></div><p id="status"></p>',
            *(_graph(g, k) for k, g in enumerate(report.graphs)),
            f"<script>{_JS}</script></body></html>\n",
        ]
    )
