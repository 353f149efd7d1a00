"""Benchmark rows rendered three ways: a text table (with side-by-side ratios), JSON, and a PNG plot."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dsv3c.artifact.atomic import atomic_file
from dsv3c.runtime.bench.measure import BenchRow

BASELINE = "transformers"


def format_table(rows: Sequence[BenchRow], bandwidth: float) -> str:
    head = (
        f"{'runtime':<13}{'phase':<8}{'context':>8}{'batch':>6}{'tokens/s':>11}{'ms/call':>10}"
        f"{'cache B/tok':>12}{'GB/call':>9}{'GB/s':>8}{'% bw':>7}"
    )
    lines = [f"memory bandwidth (numpy copy, read + write): {bandwidth / 1e9:.1f} GB/s", head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.runtime:<13}{r.phase:<8}{r.context:>8}{r.batch:>6}{r.tokens_per_s:>11.1f}{r.ms_per_call:>10.1f}"
            f"{r.cache_bytes_per_token:>12}{r.bytes_per_call / 1e9:>9.3f}{r.achieved_bytes_per_s / 1e9:>8.2f}"
            f"{100 * r.bandwidth_fraction:>6.0f}%"
        )
    lines += format_ratios(rows)
    return "\n".join(lines)


def format_ratios(rows: Sequence[BenchRow]) -> list[str]:
    """tokens/s of every runtime over transformers' at the same phase, context and batch."""
    base = {(r.phase, r.context, r.batch): r for r in rows if r.runtime == BASELINE}
    out = []
    for r in rows:
        b = base.get((r.phase, r.context, r.batch))
        if b is None or r.runtime == BASELINE:
            continue
        cache = (
            f", cache {b.cache_bytes_per_token / r.cache_bytes_per_token:.1f}x smaller"
            if r.cache_bytes_per_token
            else ""
        )
        out.append(
            f"{r.runtime} vs {BASELINE}, {r.phase} ctx {r.context} b {r.batch}: "
            f"{r.tokens_per_s / b.tokens_per_s:.2f}x tokens/s{cache}"
        )
    return ["", *out] if out else []


def write_json(rows: Sequence[BenchRow], path: Path, record: Mapping[str, Any] | None = None) -> None:
    """The rows under "rows", beside what `record` says of the run (command, commit, machine)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({**(record or {}), "rows": [r.to_dict() for r in rows]}, indent=1) + "\n")


def plot(rows: Sequence[BenchRow], path: Path) -> str:
    """Tokens/s against context, one panel per phase, one line per runtime and batch. Returns a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'dsv3c[bench]'); skipped the plot"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, phase in zip(axes, ("prefill", "decode"), strict=True):
        series: dict[tuple[str, int], list[BenchRow]] = {}
        for r in rows:
            if r.phase == phase:
                series.setdefault((r.runtime, r.batch), []).append(r)
        for (runtime, batch), points in sorted(series.items()):
            points.sort(key=lambda r: r.context)
            ax.plot(
                [p.context for p in points], [p.tokens_per_s for p in points], marker="o", label=f"{runtime} b{batch}"
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(phase)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return f"wrote {path}"
