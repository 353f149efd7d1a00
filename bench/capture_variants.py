"""Which session settings let onnxruntime capture a decode step as a CUDA graph where the default does not.

    python bench/capture_variants.py FOLDER [--batch 32] [--capacity 256] [--steps 16] [--out FILE]

At batch 32 the V2-Lite capture failed on the H200 ("Failed to allocate memory for requested buffer of size
4096" from the BFC arena while capturing: a cudaMalloc is not allowed inside a capture), although two
uncaptured runs came first and no memory was short. Each variant opens runtime/ort_cuda_graph.py's
StaticDecoder with one change and reports ms/step or the first line of its error. Measured at d0fc5e5
(bench/results/capture_variants_v2-lite_b32_h200_2026-12-02b.json): only six uncaptured runs worked,
which StaticDecoder now makes by default.

    default                 StaticDecoder's default (six uncaptured runs since; two when measured)
    two-warm-up-runs        two uncaptured runs, then the capture
    more-warm-up-runs       six uncaptured runs
    no-memory-pattern       onnxruntime's memory pattern off (its one block per run, sized after run one)
    arena-as-requested      the CUDA arena grows by what is asked, not by powers of two
    both                    no memory pattern, arena as requested

The first that works is printed last as `works: NAME` (bench/decode_gpu.sh passes it to gpu_decode.py).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

from _bootstrap import import_dsv3c

import_dsv3c()

import torch  # noqa: E402
from _capture_settings import CAPTURE_SETTINGS  # noqa: E402
from _gpu import fill_if_weightless, no_cuda  # noqa: E402
from dsv3c.eval.record import run_record, write_result  # noqa: E402
from dsv3c.runtime.ort_cuda_graph import StaticDecoder  # noqa: E402


def try_variant(folder: Path, args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    ids = torch.zeros(args.batch, 1, dtype=torch.long, device="cuda")
    positions = torch.full((args.batch, 1), args.capacity // 2, dtype=torch.long, device="cuda")
    decoder = None
    try:
        decoder = StaticDecoder(folder, args.batch, args.capacity, cuda_graph=True, **options)
        for _ in range(3):
            decoder.step(ids, positions)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            decoder.step(ids, positions)
        torch.cuda.synchronize()
        return {"ms_per_step": (time.perf_counter() - start) / args.steps * 1e3}
    except Exception as e:  # onnxruntime's errors: their first line is the finding
        return {"error": (str(e).strip().splitlines() or [type(e).__name__])[0][:300]}
    finally:
        del decoder
        gc.collect()
        torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--capacity", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--commit", default="")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if no_cuda("capture_variants"):
        return 2
    fill_if_weightless(args.folder)
    rows = []
    for name, options in CAPTURE_SETTINGS.items():
        row = {"variant": name, "batch": args.batch, "capacity": args.capacity}
        row.update(try_variant(args.folder, args, options))
        result = row.get("error") or f"{row['ms_per_step']:.2f} ms/step"
        print(f"{args.folder.name} batch {args.batch}, {name}: {result}", flush=True)
        rows.append(row)
    working = [r["variant"] for r in rows if "ms_per_step" in r]
    print(f"works: {working[0] if working else 'none'}")
    if args.out is not None:
        record = run_record(commit=args.commit)
        write_result(args.out, {**record, "model": args.folder.name, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
