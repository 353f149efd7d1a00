"""GPU benchmark: onnxruntime's CUDA execution provider vs PyTorch eager on the GPU, against the bandwidth floor.

For each export folder: prefill and decode tokens/s at every context and batch, and decode ms/token next to
the floor = bytes a decode step must read (the weights it touches + the latent cache) / the device's
measured copy bandwidth.

Here (CPU machine), write the topologies without weights (a few MB each, easy to carry):

    dsv3c export --preset small --weights none --out gpu/small
    dsv3c export --preset v2-lite --weights none --dtype bf16 --out gpu/v2-lite

On the GPU machine (onnxruntime-gpu staged with ../shared/tools/gpu-stage, torch with CUDA):

    python bench/gpu_decode.py gpu/small gpu/v2-lite --out gpu.json

A `--weights none` folder is filled with random weights in place first (drawn on the GPU; see
bench/fill_random_weights.py). PyTorch runs the same topology with its own random weights, made on the GPU
(speed does not depend on the values; the routing of random weights is similar in both).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from _bootstrap import import_dsv3c


def random_model(config: Any, dtype: Any, device: str, seed: int = 0) -> Any:
    """Our PyTorch model with N(0, 0.02) weights (ones for norms) made directly on `device`."""
    import torch
    from dsv3c.models.checkpoint_layout import assign_parameter, finish_model
    from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        if name.endswith("norm.weight"):
            tensor = torch.ones(p.shape, dtype=dtype, device=device)
        elif name.endswith("e_score_correction_bias"):
            tensor = torch.zeros(p.shape, dtype=torch.float32, device=device)
        else:
            tensor = torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
        assign_parameter(model, name, tensor)
    return finish_model(model).to(device).eval()


def bench_folder(folder: Path, args: argparse.Namespace, bandwidth: float) -> list[Any]:
    import torch
    from dsv3c.artifact.manifest import read_manifest
    from dsv3c.models.config import DeepseekV3Config
    from dsv3c.runtime.bench import BenchPlan, run_bench
    from dsv3c.runtime.bench_models import EngineRunner
    from dsv3c.runtime.ort_backend import TORCH_TYPES, OrtEngine
    from dsv3c.runtime.random_weights import fill_random
    from dsv3c.runtime.torch_backend import TorchEngine

    manifest = read_manifest(folder)
    if manifest.weights == "none":
        start = time.perf_counter()
        size = fill_random(folder, seed=args.seed, device=args.device)
        print(f"{folder}: filled {size / 2**30:.1f} GiB of random weights in {time.perf_counter() - start:.0f} s")
    config, dtype = DeepseekV3Config.from_dict(manifest.config), TORCH_TYPES[manifest.cache.dtype]
    label = str(manifest.stages[0].get("source", folder.name)) if manifest.stages else folder.name

    def ort() -> EngineRunner:
        return EngineRunner("ort", OrtEngine(folder, args.device, roles=("prefill", "decode")), dtype.itemsize)

    def eager() -> EngineRunner:
        return EngineRunner("torch", TorchEngine(random_model(config, dtype, args.device, args.seed)), dtype.itemsize)

    plan = BenchPlan(
        args.contexts,
        args.batches,
        args.runtimes,
        args.steps,
        args.prefill_chunk,
        args.seed,
        model=label,
        device=args.device,
        one_at_a_time=args.one_at_a_time,
    )
    rows = run_bench(plan, {"ort": ort, "torch": eager}, bandwidth, lambda m: print(m, flush=True))
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def floor_table(rows: list[Any], bandwidth: float) -> str:
    head = f"{'model':<10}{'runtime':<9}{'context':>8}{'batch':>6}{'ms/token':>10}{'floor ms':>10}{'x floor':>9}"
    lines = [f"device copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s", head]
    for r in rows:
        if r.phase == "decode":
            floor = r.bytes_per_call / bandwidth * 1e3
            lines.append(
                f"{r.model:<10}{r.runtime:<9}{r.context:>8}{r.batch:>6}{r.ms_per_call:>10.2f}{floor:>10.3f}"
                f"{r.ms_per_call / floor:>9.1f}"
            )
    return "\n".join(lines)


def main() -> int:
    import_dsv3c()
    import torch
    from dsv3c.errors import UserError
    from dsv3c.runtime.bench_models import copy_bandwidth, device_bandwidth
    from dsv3c.runtime.bench_report import format_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", type=Path, nargs="+", help="export folders (weights none: filled in place)")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runtimes", nargs="+", choices=["ort", "torch"], default=["ort", "torch"])
    p.add_argument("--steps", type=int, default=16, help="timed decode steps (after one untimed)")
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--one-at-a-time", action="store_true", help="load one runtime at a time (less GPU memory)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run on a CPU machine")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_decode: error: torch sees no CUDA device; run this on the GPU machine", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True  # onnxruntime's CUDA EP runs fp32 MatMul in TF32 as well
    bandwidth = device_bandwidth() if args.device == "cuda" else copy_bandwidth(64)
    rows = []
    try:
        for folder in args.folders:
            rows += bench_folder(folder, args, bandwidth)
    except UserError as e:
        print(f"gpu_decode: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, bandwidth))
    print(floor_table(rows, bandwidth))
    if args.out is not None:
        args.out.write_text(json.dumps([r.to_dict() for r in rows], indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
