"""Time `dsv3c diff` on the full DeepSeek-V3 topology (weights declared, not written), before vs after fp8.

    python bench/diff_scale.py [--layers 61] [--out DIR] [--result bench/results/FILE.json]

Runs the real pipeline: `dsv3c export --preset v3 --weights none`, then `dsv3c quantize` of that folder;
the diff reads the passes' provenance marks.

Prints seconds for loading one graph as an `ir.Model` (external weights declared, never read), for load +
match + diff, for each renderer, and for inspect, and peak RSS; `--result` also writes them as JSON with the
command, the commit and the machine.
Goal (issue 7, kept by issue 10): the whole diff under 60 s on the 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def exported_folder(out: Path, layers: int) -> None:
    from dsv3c.export.exporter import export
    from dsv3c.export.source import Source
    from dsv3c.models.config import DeepseekV3Config

    config = DeepseekV3Config.from_preset("v3")
    if layers != config.num_hidden_layers:
        dense = min(config.first_k_dense_replace, layers)
        config = config.replace(num_hidden_layers=layers, first_k_dense_replace=dense)
    export(Source("preset", "v3", config, None), out, weights="none", force=True)


def quantized_folder(src: Path, dst: Path) -> None:
    from dsv3c.passes.pipelines import QuantizeOptions
    from dsv3c.passes.quantize import quantize_folder

    quantize_folder(src, dst, QuantizeOptions())


SECONDS: dict[str, float] = {}  # label -> seconds, in the order measured


def timed(label: str, fn, *args):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = fn(*args)
    SECONDS[label] = round(time.perf_counter() - start, 3)
    print(f"{label:<34} {SECONDS[label]:>7.2f} s", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=61)
    p.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--result", type=Path, default=None, help="write the timings as a result file (JSON)")
    args = p.parse_args()
    from dsv3c.graph.diff import diff_paths
    from dsv3c.graph.load import load_graph
    from dsv3c.graph.render_html import render_html
    from dsv3c.graph.render_json import render_json
    from dsv3c.graph.render_text import render_diff
    from dsv3c.graph.summary import inspect_path

    scratch = args.out or Path(tempfile.mkdtemp(prefix="dsv3c-diff-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    a, b = scratch / "a", scratch / "b"
    shutil.rmtree(a, ignore_errors=True)
    shutil.rmtree(b, ignore_errors=True)
    try:
        timed(f"export v3 --weights none ({args.layers} layers)", exported_folder, a, args.layers)
        timed("quantize (dsv3c quantize)", quantized_folder, a, b)
        loaded = timed("load prefill.onnx (ir.Model)", load_graph, a / "prefill.onnx")
        print(f"  {len(loaded.graph)} nodes, {len(loaded.tensors)} initializers declared, none read")
        start = time.perf_counter()
        report = timed("diff: load + match + group", diff_paths, a, b)
        text = timed("render text", render_diff, report)
        timed("render json", render_json, report)
        html = timed("render html", render_html, report)
        total = time.perf_counter() - start
        timed("inspect (after)", inspect_path, b)
        nodes = sum(g.nodes_a + g.nodes_b for g in report.graphs)
        rewrites = sum(len(g.rewrites) for g in report.graphs)
        other = sum(g.differences - len(g.rewrites) for g in report.graphs)
        print(f"{'diff total (load .. html)':<34} {total:>7.2f} s  (goal: < 60 s)")
        print(
            f"graphs {len(report.graphs)}, nodes A+B {nodes}, rewrites {rewrites}, other differences {other}, "
            f"text {len(text) / 1024:.0f} KiB, html {len(html) / 1024:.0f} KiB"
        )
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"peak RSS {rss:.2f} GB")
        if args.result is not None:
            from dsv3c.eval.record import run_record, write_result

            result = {
                **run_record(),
                "layers": args.layers,
                "seconds": SECONDS,
                "diff_total_seconds": round(total, 3),
                "goal_seconds": 60,
                "graphs": len(report.graphs),
                "nodes_a_plus_b": nodes,
                "rewrites": rewrites,
                "other_differences": other,
                "peak_rss_gb": round(rss, 3),
            }
            write_result(args.result, result)
            print(f"wrote {args.result}")
        return 0 if total < 60 else 1
    finally:
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
