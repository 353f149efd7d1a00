"""How long onnxruntime takes to open an export folder's graphs: what a user waits for before decoding.

    python bench/session_load.py FOLDER [FOLDER ...] [--roles decode] [--threads 2] [--out FILE]

Per folder and role: InferenceSession creation with onnxruntime's default graph optimizations (which fold
whatever the graph computes from weights alone) and with optimizations off (reading the graph and its
weights only), the median of --repeats. Folders side by side in one run, CPU provider (or --provider).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _bootstrap import import_dsv3c

import_dsv3c()

import onnxruntime as ort  # noqa: E402
from dsv3c.eval.record import run_record, write_result  # noqa: E402


def load_seconds(path: Path, provider: str, threads: int, optimize: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        start = time.perf_counter()
        ort.InferenceSession(str(path), options, providers=[provider])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--roles", nargs="+", default=["decode"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--provider", default="CPUExecutionProvider")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = []
    for folder in args.folders:
        for role in args.roles:
            path = folder / f"{role}.onnx"
            if not path.is_file():
                print(f"session_load: error: {path} does not exist; give export folders", file=sys.stderr)
                return 2
            row = {"folder": str(folder), "role": role}
            for optimize in (True, False):
                key = "load_s" if optimize else "load_s_no_optimizations"
                row[key] = load_seconds(path, args.provider, args.threads, optimize, args.repeats)
            print(f"{folder} {role}: {row['load_s']:.2f} s ({row['load_s_no_optimizations']:.2f} s unoptimized)")
            rows.append(row)
    if args.out:
        write_result(args.out, {**run_record(), "provider": args.provider, "threads": args.threads, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
