r"""IREE on the GPU: the iree lowering compiled for CUDA, run with IREE's `cuda` driver, against PyTorch and
onnxruntime on the same fixed token ids, and timed.

Here (CPU machine, iree-base-compiler installed), write the folders (the iree lowering with its graphs
compiled for the GPU, `{role}.vmfb`; IREE 3.13 has no sm_90 description, so the PTX is built for sm_89 and
the CUDA driver JIT-compiles it for the H200 at load; `dsv3c lower` says so):

    dsv3c init --preset tiny --dtype fp32 --out runs/iree-cuda/tiny-ckpt
    dsv3c export runs/iree-cuda/tiny-ckpt --out runs/iree-cuda/tiny-canon
    dsv3c lower runs/iree-cuda/tiny-canon --target iree --emit vmfb --backend cuda --gpu-target sm_90 \
        --out runs/iree-cuda/tiny-iree-cuda

Only manifest.json, the .onnx graphs, weights.bin and {prefill,decode}.vmfb need to travel (not the .mlir).
On the GPU machine (iree-base-runtime, a 14.4 MiB cp312 wheel, installed; torch and onnxruntime as in its
image). IREE's cuda driver dlopens `libcuda.so` by that name only; where the image has only libcuda.so.1,
link it first:

    mkdir -p /tmp/cudalib && ln -sf "$(ldconfig -p | awk '/libcuda.so.1 /{print $NF; exit}')" /tmp/cudalib/libcuda.so
    LD_LIBRARY_PATH=/tmp/cudalib:$LD_LIBRARY_PATH python bench/iree_cuda.py runs/iree-cuda/tiny-iree-cuda \
        --checkpoint runs/iree-cuda/tiny-ckpt --out iree_cuda.json

The same comparison runs on this CPU with a folder compiled for llvm-cpu (`--emit vmfb` without --backend)
and `--driver local-task`. Prefill runs the folder's fixed (batch, seq) window; decode then takes one more
token over the prefill's latent cache (the lowering's `past` must equal `seq`). The references: our PyTorch
model (models/) in float32 on the CPU over all seq + 1 tokens, and onnxruntime (CPU) on the folder's own
.onnx graphs, the ones IREE compiled. Errors are max |a - b| and that over max |reference| (`rel`); top-1 is
the share of positions whose argmax agrees. Timing: the median of --steps calls after --warmup, inputs
uploaded to the device first (a call returns when its outputs are computed); PyTorch eager on the same GPU
(its own latent cache for decode), onnxruntime on the CPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _bootstrap import import_dsv3c

# max |a - b| / max |reference| that counts as parity, by the export's dtype: float32 graphs differ from the
# reference in summation order only; bfloat16 ones by rounding (eps 2^-8) through every layer
TOLERANCE = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 1e-2}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="an iree-lowered folder with {role}.vmfb (dsv3c lower --emit vmfb)")
    p.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint the folder was exported from")
    p.add_argument("--driver", default="cuda", choices=("cuda", "local-task"), help="IREE runtime driver")
    p.add_argument("--steps", type=int, default=20, help="timed calls per graph (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--seed", type=int, default=0, help="seed of the token ids")
    p.add_argument("--rtol", type=float, help="parity bound on max|a-b| / max|ref| (default by the export's dtype)")
    p.add_argument("--out", type=Path, help="write the result JSON here")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main() -> int:
    import_dsv3c()
    from dsv3c.errors import UserError

    args = parse()
    try:
        result = run(args)
    except UserError as e:
        print(f"iree_cuda: error: {e}", file=sys.stderr)
        return 2
    print_result(result)
    if args.out:
        from dsv3c.eval.record import write_result

        write_result(args.out, result)
        print(f"wrote {args.out}")
    return 0


def compare(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a, b = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if a.shape != b.shape:
        from dsv3c.errors import UserError

        raise UserError(f"logits of shape {list(a.shape)} against a reference of shape {list(b.shape)}")
    max_abs = float(np.abs(a - b).max())
    return {
        "max_abs": max_abs,
        "rel": max_abs / max(float(np.abs(b).max()), 1e-30),
        "top1": float((a.argmax(-1) == b.argmax(-1)).mean()),
    }


def median_ms(fn: Callable[[], object], steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def folder_plan(folder: Path, driver: str) -> tuple[Any, dict[str, Any]]:
    """The manifest and its lowering's vmfb record, checked against the driver and the shapes this needs."""
    from dsv3c.artifact.manifest import read_manifest
    from dsv3c.errors import UserError
    from dsv3c.passes.mlir import DRIVERS

    manifest = read_manifest(folder)
    stage = manifest.stages[-1] if manifest.stages else {}
    if stage.get("stage") != "lower" or stage.get("target") != "iree" or "vmfb" not in stage:
        raise UserError(f"{folder} has no compiled IREE modules; make it with dsv3c lower --target iree --emit vmfb")
    vmfb = stage["vmfb"]
    if DRIVERS.get(vmfb.get("backend")) != driver:
        raise UserError(
            f"{folder} was compiled for {vmfb.get('backend')}; run it with --driver {DRIVERS[vmfb['backend']]}"
        )
    for role in ("prefill", "decode"):
        if role not in vmfb.get("files", {}):
            raise UserError(f"{folder} has no compiled {role} graph")
    seq = manifest.signatures["prefill"].inputs[0].shape[1]
    past = next(t.shape[1] for t in manifest.signatures["decode"].inputs if t.name.startswith("past_ckv"))
    if past != seq:
        raise UserError(
            f"{folder}: decode's past ({past}) must equal prefill's seq ({seq}); lower with --shape seq=N,past=N"
        )
    return manifest, vmfb


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dsv3c.errors import UserError

    if importlib.util.find_spec("iree") is None or importlib.util.find_spec("iree.runtime") is None:
        raise UserError("iree.runtime is not installed; pip install iree-base-runtime==3.13.0")
    from dsv3c.passes.mlir import IreeModule

    manifest, vmfb = folder_plan(args.folder, args.driver)
    # the device first: no CUDA device is one line, before any reference work
    prefill_module = IreeModule(args.folder / vmfb["files"]["prefill"], args.driver)
    decode_module = IreeModule(args.folder / vmfb["files"]["decode"], args.driver)
    batch, seq = manifest.signatures["prefill"].inputs[0].shape[:2]
    vocab = int(manifest.config["vocab_size"])
    ids = np.random.default_rng(args.seed).integers(0, vocab, (batch, seq + 1), dtype=np.int64)
    feeds = {"input_ids": ids[:, :seq], "positions": np.tile(np.arange(seq, dtype=np.int64), (batch, 1))}
    step = {"input_ids": ids[:, seq:], "positions": np.full((batch, 1), seq, dtype=np.int64)}

    runs: dict[str, dict[str, np.ndarray]] = {}
    timing: dict[str, dict[str, Any]] = {}
    runs["iree"], timing["iree"] = run_iree(manifest, prefill_module, decode_module, feeds, step, args)
    skipped: dict[str, str] = {}
    try:
        runs["onnxruntime"], timing["onnxruntime"] = run_ort(args.folder, feeds, step, args)
    except UserError as e:  # e.g. onnxruntime's CPU kernels have no bfloat16 Mul: a result, not a crash
        skipped["onnxruntime"] = str(e)
    reference, timing["torch"] = run_torch(args.checkpoint, ids, seq, str(manifest.dtype), args)
    runs["torch"] = reference

    dtype = str(manifest.dtype)
    rtol = args.rtol if args.rtol is not None else TOLERANCE.get(dtype, 3e-2)
    pairs = [("iree", "torch")] + ([("onnxruntime", "torch"), ("iree", "onnxruntime")] if "onnxruntime" in runs else [])
    parity = {
        role: {f"{a}_vs_{b}": compare(runs[a][role], runs[b][role]) for a, b in pairs} for role in ("prefill", "decode")
    }
    from dsv3c.eval.record import run_record

    record = run_record()
    record["machine"]["iree_runtime"] = importlib.metadata.version("iree-base-runtime")
    return {
        **record,
        "folder": str(args.folder),
        "checkpoint": str(args.checkpoint),
        "driver": args.driver,
        "iree_device": iree_devices(args.driver),
        "compiled": {k: v for k, v in vmfb.items() if k != "files"},
        "dtype": dtype,
        "shapes": {"batch": batch, "seq": seq, "decode_past": seq},
        "seed": args.seed,
        "tolerance": {"metric": "max|a-b| / max|torch|", "rtol": rtol},
        "parity": parity,
        "within_tolerance": all(p["iree_vs_torch"]["rel"] <= rtol for p in parity.values()),
        "timing_ms": timing,
        "skipped": skipped,
        "timing_note": f"median of {args.steps} calls after {args.warmup}; iree and torch on the {args.driver} "
        "device (inputs uploaded first), onnxruntime on the CPU",
    }


def run_iree(
    manifest: Any,
    prefill: Any,
    decode: Any,
    feeds: dict[str, np.ndarray],
    step: dict[str, np.ndarray],
    args: argparse.Namespace,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Prefill, then decode over the prefill's own cache outputs (kept on the device)."""
    outputs = [t.name for t in manifest.signatures["prefill"].outputs]
    prefill_in = prefill.upload([feeds[t.name] for t in manifest.signatures["prefill"].inputs])
    prefill_out = prefill.call("prefill", prefill_in)
    produced = dict(zip(outputs, prefill_out, strict=True))
    cache = {name.replace("new_", "past_"): value for name, value in produced.items() if name.startswith("new_")}
    decode_in = []
    for t in manifest.signatures["decode"].inputs:
        if t.name in cache:
            decode_in.append(decode.upload(prefill.to_numpy([cache[t.name]]))[0])
        else:
            decode_in.append(decode.upload([step[t.name]])[0])
    decode_out = decode.call("decode", decode_in)
    logits = {
        "prefill": prefill.to_numpy([produced["logits"]])[0],
        "decode": decode.to_numpy(
            [decode_out[[t.name for t in manifest.signatures["decode"].outputs].index("logits")]]
        )[0],
    }
    timing = {
        "prefill": median_ms(lambda: prefill.call("prefill", prefill_in), args.steps, args.warmup),
        "decode": median_ms(lambda: decode.call("decode", decode_in), args.steps, args.warmup),
    }
    return logits, timing


def run_ort(
    folder: Path, feeds: dict[str, np.ndarray], step: dict[str, np.ndarray], args: argparse.Namespace
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """onnxruntime (CPU) on the folder's prefill and decode graphs: the graphs IREE compiled."""
    from dsv3c.passes.ort_run import GraphRunner, load_graph

    prefill, decode = (
        GraphRunner(load_graph(folder, "prefill"), folder),
        GraphRunner(load_graph(folder, "decode"), folder),
    )
    out = prefill.run(feeds)
    decode_feeds = {**step, **{k.replace("new_", "past_"): v for k, v in out.items() if k.startswith("new_")}}
    logits = {"prefill": np.asarray(out["logits"]), "decode": np.asarray(decode.run(decode_feeds)["logits"])}
    timing = {
        "prefill": median_ms(lambda: prefill.run(feeds), args.steps, args.warmup),
        "decode": median_ms(lambda: decode.run(decode_feeds), args.steps, args.warmup),
    }
    return logits, timing


def run_torch(
    checkpoint: Path, ids: np.ndarray, seq: int, dtype: str, args: argparse.Namespace
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The reference: float32 on the CPU over all seq + 1 tokens (prefill = the first seq positions, decode =
    the last). Timed on the benchmark's device in the export's dtype: prefill of seq tokens, one decode step
    over its cache."""
    import torch
    from dsv3c.models.checkpoint import load_model

    model = load_model(checkpoint).eval()
    tokens = torch.from_numpy(ids)
    positions = torch.arange(seq + 1).expand(ids.shape[0], -1)
    with torch.no_grad():
        logits = model(tokens, positions).logits.numpy()
    reference = {"prefill": logits[:, :seq], "decode": logits[:, seq:]}

    device = "cuda" if args.driver == "cuda" and torch.cuda.is_available() else "cpu"
    model = model.to(device, dtype=getattr(torch, dtype))
    tokens, positions = tokens.to(device), positions.to(device)
    lengths = torch.full((ids.shape[0],), seq, device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        cache = model(tokens[:, :seq], positions[:, :seq]).new_cache

        def prefill() -> None:
            model(tokens[:, :seq], positions[:, :seq])
            sync()

        def decode() -> None:
            model(tokens[:, seq:], positions[:, seq:], past=cache, past_lengths=lengths)
            sync()

        timing = {
            "prefill": median_ms(prefill, args.steps, args.warmup),
            "decode": median_ms(decode, args.steps, args.warmup),
            "device": device,
            "dtype": dtype,
        }
    return reference, timing


def iree_devices(driver: str) -> list[dict[str, Any]]:
    import iree.runtime as rt

    try:
        return [dict(d) for d in rt.get_driver(driver).query_available_devices()]
    except RuntimeError:
        return []


def print_result(result: dict[str, Any]) -> None:
    rtol = result["tolerance"]["rtol"]
    compiled = result["compiled"]
    target = f" {compiled['gpu_target']}, PTX for {compiled['compiled_for']}" if compiled["backend"] == "cuda" else ""
    print(
        f"{result['folder']} on IREE {result['driver']} ({compiled['backend']}{target}), dtype {result['dtype']}, "
        f"batch {result['shapes']['batch']} seq {result['shapes']['seq']}"
    )
    for role, pairs in result["parity"].items():
        for pair, e in pairs.items():
            mark = "" if pair != "iree_vs_torch" else ("  ok" if e["rel"] <= rtol else f"  OVER {rtol:g}")
            print(f"  {role:7s} {pair:22s} max abs {e['max_abs']:.2e}  rel {e['rel']:.2e}  top-1 {e['top1']:.3f}{mark}")
    for runtime, t in result["timing_ms"].items():
        where = t.get("device", result["driver"] if runtime == "iree" else "cpu")
        print(f"  {runtime:11s} prefill {t['prefill']:8.3f} ms  decode {t['decode']:8.3f} ms  ({where})")
    for runtime, reason in result["skipped"].items():
        print(f"  {runtime} skipped: {reason}")
    print("within tolerance" if result["within_tolerance"] else f"NOT within tolerance (rel <= {rtol:g})")


if __name__ == "__main__":
    sys.exit(main())
