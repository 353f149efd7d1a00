"""What one static decode step spends on the GPU: its CUDA kernels by name (count and device time per step),
the device busy time against the step's wall time, uncaptured and replayed as a CUDA graph (the new cache
entries stored by one scatter per kind for all layers, and by one per layer, side by side).

    python bench/gpu_step_kernels.py FOLDER [FOLDER ...] [--batch 1] [--capacity 256] [--steps 10] [--top 25]
                                     [--capture-settings NAME] [--commit C] [--out FILE]
    python bench/gpu_step_kernels.py --from RESULT.json [--top 0]   # a stored run's summary, on any machine

FOLDER is a `lower --target ort` folder (a `--weights none` one is filled with random weights on the GPU,
as bench/gpu_decode.py does). The kernels are recorded with torch.profiler (CUPTI sees every kernel of the
process, onnxruntime's included) over --steps uncaptured steps of runtime/ort_cuda_graph.py's StaticDecoder.
Busy time over wall time says how much of a step is kernels and how much is the gaps between them: a
launch-bound step shows many short kernels and a low busy fraction uncaptured; the capture removes the
launches but not the kernels themselves.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
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


def wall_ms(decoder: StaticDecoder, ids: torch.Tensor, positions: torch.Tensor, steps: int) -> float:
    for _ in range(3):
        decoder.step(ids, positions)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        decoder.step(ids, positions)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def kernels_per_step(decoder: StaticDecoder, ids: torch.Tensor, positions: torch.Tensor, steps: int) -> Any:
    """{kernel, memcpy or memset name: (launches, device us)} per step, over `steps` recorded steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step(ids, positions)
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.profiler.kineto_results.events():  # raw records: each kernel, memcpy and memset once
        if event.device_type() == torch.autograd.DeviceType.CUDA:
            name = event.name()[:120]
            totals[name][0] += 1
            totals[name][1] += event.duration_ns() / 1e3
    return {name: (n / steps, us / steps) for name, (n, us) in totals.items()}


# kernel name fragments -> what they do, first match wins (cuBLAS, onnxruntime's and torch's kernel names)
CATEGORIES = (
    ("MoE", ("MoeFCGemm", "GroupProblemShape", "cutlass_kernels::", "SoftmaxTopK", "moe_gemv")),
    ("dense GEMM", ("nvjet", "gemv", "gemm", "dot_kernel", "splitKreduce", "reduce_1Block", "MatMulFloat8b")),
    ("Cast", ("OP_Cast",)),
    ("routing (TopK, gather, scatter)", ("TopK", "GatherScatterElements")),
    ("cache writes (torch)", ("index_put", "arange")),
    ("memcpy, memset", ("Memcpy", "Memset")),
)


def categorized(kernels: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """{category: (launches, us) per step} of a row's kernels; what matches no fragment is "other"."""
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for k in kernels:
        kind = next((c for c, parts in CATEGORIES if any(p in k["name"] for p in parts)), "other")
        out[kind][0] += k["launches"]
        out[kind][1] += k["us"]
    return {c: (n, us) for c, (n, us) in sorted(out.items(), key=lambda kv: -kv[1][1])}


def print_summary(row: dict[str, Any], top: int) -> None:
    print(
        f"{row['model']} batch {row['batch']} capacity {row['capacity']}: {row['kernels_per_step']:.0f} kernels/step, "
        f"busy {row['kernel_busy_ms']:.2f} ms; wall {row['uncaptured_ms']:.2f} ms uncaptured, "
        f"{row['captured_ms']:.2f} ms captured ({row['captured_per_layer_writes_ms']:.2f} with a scatter per layer)"
    )
    for kind, (n, us) in categorized(row["kernels"]).items():
        print(f"  {us / 1e3:6.2f} ms {n:6.0f}x  {kind}")
    for k in row["kernels"][:top]:
        print(f"  {k['us']:8.1f} us {k['launches']:6.0f}x  {k['name']}")


def profile_folder(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    fill_if_weightless(folder)
    ids = torch.zeros(args.batch, 1, dtype=torch.long, device="cuda")
    positions = torch.full((args.batch, 1), args.capacity // 2, dtype=torch.long, device="cuda")
    row: dict[str, Any] = {"model": folder.name, "batch": args.batch, "capture_settings": args.capture_settings}
    settings = CAPTURE_SETTINGS[args.capture_settings]
    plain = StaticDecoder(folder, args.batch, args.capacity, cuda_graph=False, **settings)
    row["capacity"] = plain.capacity
    row["uncaptured_ms"] = wall_ms(plain, ids, positions, args.steps)
    kernels = kernels_per_step(plain, ids, positions, args.steps)
    del plain
    # captured, the new cache entries stored by two scatters (all layers) or by two per layer, taking turns
    both = {
        writes: StaticDecoder(folder, args.batch, args.capacity, cuda_graph=True, per_layer_writes=writes, **settings)
        for writes in (False, True)
    }
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for writes, decoder in both.items():
            times[writes].append(wall_ms(decoder, ids, positions, args.steps))
    del both
    row["captured_ms"] = statistics.median(times[False])
    row["captured_per_layer_writes_ms"] = statistics.median(times[True])
    busy_us = sum(us for _, us in kernels.values())
    row["kernels_per_step"] = sum(n for n, _ in kernels.values())
    row["kernel_busy_ms"] = busy_us / 1e3
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    row["kernels"] = [{"name": k, "launches": n, "us": us} for k, (n, us) in ranked]
    print_summary(row, args.top)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", type=Path, nargs="*")
    p.add_argument("--from", dest="result", type=Path, help="print the summary of a results file instead")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--capacity", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--rounds", type=int, default=5, help="turns of the two captured forms")
    p.add_argument("--capture-settings", choices=CAPTURE_SETTINGS, default="default", help="the sessions' settings")
    p.add_argument("--commit", default="")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.result is not None:  # no GPU needed: the kernels by category of a stored run
        for row in json.loads(args.result.read_text())["rows"]:
            print_summary(row, args.top)
        return 0
    if not args.folders:
        p.error("give FOLDER(s) to profile, or --from RESULT")
    if no_cuda("gpu_step_kernels"):
        return 2
    rows = [profile_folder(folder, args) for folder in args.folders]
    if args.out is not None:
        record = run_record(commit=args.commit)
        write_result(args.out, {**record, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
