"""Decode ms/token of the ort lowering's decode attentions (`lower --decode-cache`), per context: over the
cache the step writes in place (the default, passes/ort_cache_in_place.py), over the past cache and the new
entries apart (passes/ort_split_past.py), and over their exported Concat.

    python bench/attention_past_apart.py [--preset small] [--capacities 128 1024 4096 16384] [--steps 5]
                                         [--rounds 8] [--device cpu|cuda] [--work DIR] [--out FILE]

Exports the preset (--weights none), lowers it each way, fills each with the same random weights, and per
capacity opens the decode graphs as runtime/ort_cuda_graph.py's StaticDecoder (batch 1, the cache's
capacity = the context; a static step attends over all of it) and times them taking turns
(runtime/bench/static_steps.py). Also the largest logits difference of each to the default, relative to
the largest logit, and the cache bytes a step must read once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _bootstrap import import_dsv3c

import_dsv3c()

import torch  # noqa: E402
from _ort_variants import max_relative_difference, ort_variants  # noqa: E402
from dsv3c.artifact.manifest import read_manifest  # noqa: E402
from dsv3c.eval.record import run_record, write_result  # noqa: E402
from dsv3c.passes.pipelines import DecodeCache  # noqa: E402
from dsv3c.runtime.bench.static_steps import interleaved_step_ms  # noqa: E402

LOWERINGS = {name: {"decode_cache": DecodeCache(name)} for name in ("concat", "apart", "in-place")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--capacities", type=int, nargs="+", default=[128, 1024, 4096, 16384])
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: onnxruntime's CUDA EP")
    p.add_argument("--work", type=Path, help="folder for the export and lowerings (default: a temporary one)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        folders = ort_variants(args.preset, work, LOWERINGS, args.device)
        if folders is None:
            return 2
        c = read_manifest(work / "canon").cache  # the main cache only (the MTP module's is not read by a decode step)
        token_bytes = c.width * c.layers * getattr(torch, c.dtype).itemsize
        for capacity in args.capacities:
            timed = interleaved_step_ms(folders, capacity, args.steps, args.rounds, args.device, args.threads)
            times = timed.ms
            row = {
                "context": timed.capacity,  # the asked one rounded up to whole cache growth chunks
                "cache_bytes_per_step": token_bytes * timed.capacity,
            }
            for name, ms in times.items():
                row[name] = {
                    "ms_per_token_median": statistics.median(ms),
                    "ms_per_token_min": min(ms),
                    "ms": ms,
                    "logits_max_rel_difference_to_apart": max_relative_difference(
                        timed.logits["apart"], timed.logits[name]
                    ),
                }
            apart = row["apart"]["ms_per_token_median"]
            cells = [
                f"{name} {row[name]['ms_per_token_median']:.2f} ms ({apart / row[name]['ms_per_token_median']:.2f}x "
                f"apart's speed, logits {row[name]['logits_max_rel_difference_to_apart']:.1e} apart)"
                for name in times
            ]
            print(f"context {timed.capacity}: " + ", ".join(cells), flush=True)
            rows.append(row)
    if args.out:
        result = {
            **run_record(),
            "preset": args.preset,
            "batch": 1,
            "steps": args.steps,
            "rounds": args.rounds,
            "threads": args.threads,
            "device": args.device,
            "rows": rows,
        }
        write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
