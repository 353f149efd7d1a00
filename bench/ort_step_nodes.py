"""Nodes onnxruntime runs per static decode step, and decode ms/token, with and without the ort fusions.

    python bench/ort_step_nodes.py [--preset small] [--work DIR] [--capacity 128] [--steps 8] [--rounds 4]
                                   [--device cpu|cuda] [--out FILE]

Exports the preset (--weights none), lowers it with `--target ort` twice (the default pipeline and the same
without its `ort-fusions` and `ort-rotary` stages), fills both with the same random weights, and per
lowering opens the decode graph as runtime/ort_cuda_graph.py's StaticDecoder (batch 1): one profiled step,
not captured, counted by op type and provider (the node events `placement_from_profile` counts), then
--rounds rounds of --steps timed steps, the lowerings taking turns (on --device cuda replayed as a CUDA
graph). Also the largest difference between the two lowerings' logits at the same step, relative to the
largest logit.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from _bootstrap import import_dsv3c

import_dsv3c()

import torch  # noqa: E402
from _ort_variants import max_relative_difference, ort_variants  # noqa: E402
from dsv3c.eval.record import run_record, write_result  # noqa: E402
from dsv3c.runtime.bench.static_steps import interleaved_step_ms  # noqa: E402
from dsv3c.runtime.ort_cuda_graph import StaticDecoder, node_events  # noqa: E402

LOWERINGS = {"unfused": {"ort_fusions": False}, "fused": {"ort_fusions": True}}  # name -> lower_folder options


def nodes_by_op(profile: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Node events of one run by op type and by provider (the events `placement_from_profile` counts)."""
    seen = node_events(profile).values()
    return dict(collections.Counter(op for _, op in seen).most_common()), dict(collections.Counter(p for p, _ in seen))


def profile_step(folder: Path, capacity: int, device: str, threads: int) -> tuple[dict[str, Any], torch.Tensor]:
    """One profiled decode step at position 5 (rotated; the empty cache slots before it count as tokens),
    not captured: its nodes by op type and provider, and its logits."""
    decoder = StaticDecoder(folder, 1, capacity, device=device, cuda_graph=False, profile=True, threads=threads)
    logits = decoder.step(torch.tensor([[7]], device=device), torch.tensor([[5]], device=device)).cpu()
    ops, providers = nodes_by_op(Path(decoder.session.end_profiling()))
    return {"nodes_per_step": sum(ops.values()), "nodes_by_op": ops, "by_provider": providers}, logits


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--work", type=Path, help="folder for the export and lowerings (default: a temporary one)")
    p.add_argument("--capacity", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: onnxruntime's CUDA EP")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folders = ort_variants(args.preset, args.work or Path(tmp), LOWERINGS, args.device)
        if folders is None:
            return 2
        rows, logits = {}, {}
        for name, folder in folders.items():
            rows[name], logits[name] = profile_step(folder, args.capacity, args.device, args.threads)
        timed = interleaved_step_ms(folders, args.capacity, args.steps, args.rounds, args.device, args.threads)
        times = timed.ms
    for name, row in rows.items():
        row["ms_per_token_median"] = statistics.median(times[name])
        row["ms_per_token_min"] = min(times[name])
        row["ms_per_token"] = times[name]
        where = ", ".join(f"{n} on {p}" for p, n in row["by_provider"].items())
        print(f"{name}: {row['nodes_per_step']} nodes/step ({where}), {row['ms_per_token_median']:.2f} ms/token median")
        print("  " + ", ".join(f"{op} {n}" for op, n in row["nodes_by_op"].items()))
    difference = max_relative_difference(logits["unfused"], logits["fused"])
    print(f"fused vs unfused logits: max |diff| / max |logit| = {difference:.2e}")
    if args.out:
        result = {
            **run_record(),
            "preset": args.preset,
            "batch": 1,
            "capacity": timed.capacity,
            "steps": args.steps,
            "rounds": args.rounds,
            "threads": args.threads,
            "device": args.device,
            "lowerings": rows,
            "logits_max_rel_difference": difference,
        }
        write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
