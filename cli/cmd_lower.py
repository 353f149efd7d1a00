"""dsv3c lower: take an export folder (canonical or quantized) to one backend's graphs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from dsv3c.errors import UserError

if TYPE_CHECKING:
    from dsv3c.artifact.manifest import Manifest
    from dsv3c.passes.mlir import CompileTarget

HELP = "lower an export folder for a backend: portable (standard ONNX), ort, trt or iree (with --emit mlir or vmfb)"
TARGETS = ("portable", "ort", "trt", "iree")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "export_dir", type=Path, metavar="EXPORT_DIR", help="export folder (from 'dsv3c export' or quantize)"
    )
    p.add_argument(
        "--target",
        required=True,
        choices=TARGETS,
        help="portable: custom nodes inlined; ort: com.microsoft.MoE; trt: opset-23 Attention, static "
        "Q/DQ; iree: fixed shapes, element-wise Q/DQ",
    )
    p.add_argument("--out", required=True, type=Path, help="export folder to create")
    p.add_argument(
        "--emit",
        choices=("mlir", "vmfb"),
        help="also write {graph}.mlir through IREE's importer (--target iree); vmfb: and {graph}.vmfb, compiled "
        "by iree-compile for --backend",
    )
    p.add_argument(
        "--backend",
        metavar="NAME",
        help="with --emit vmfb: llvm-cpu (default; IREE's local-task driver) or cuda (IREE's cuda driver)",
    )
    p.add_argument(
        "--gpu-target",
        metavar="sm_NN",
        help="with --backend cuda: the GPU's compute capability (default sm_90, H100/H200); where IREE has no "
        "description of it, PTX for the newest one below it, which the driver JIT-compiles",
    )
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="DIM=N",
        help="fix a symbolic dimension for --target iree (batch, seq, q, past); repeatable or "
        "comma-separated; defaults batch=1,seq=16,q=1,past=16",
    )
    p.add_argument(
        "--weights-8bit",
        action="store_true",
        help="--target ort: store the linears and routed experts as 8-bit integers that onnxruntime's kernels "
        "read directly (MatMulNBits, QMoE), from FP8 or float weights; the manifest records the error this adds",
    )
    p.add_argument(
        "--weights-8bit-scope",
        choices=("all", "experts"),
        default="all",
        help="with --weights-8bit: `experts` keeps the linears float (on the GPU at one token a row, 8-bit "
        "MatMulNBits reads slower than a bf16 GEMV; the experts are nearly all of the bytes)",
    )
    p.add_argument(
        "--block-8bit",
        type=int,
        default=128,
        metavar="N",
        help="with --weights-8bit: weights per scale along the input dimension (16, 32, 64, 128; default 128)",
    )
    p.add_argument(
        "--activations",
        choices=("keep", "mxfp8"),
        default="keep",
        help="mxfp8: online activation scales (dsv3c quantize's 1x128 tiles) as MXFP8, 1x32 blocks with "
        "power-of-two E8M0 scales: TensorRT's dynamic quantization for trt (compute capability 10.0/12.x), "
        "the same numbers in standard ONNX ops for portable and ort",
    )
    p.add_argument(
        "--mxfp8-weights",
        action="store_true",
        help="with --activations mxfp8: re-quantize the FP8 weights those activations meet to MXFP8 too "
        "(1x32 along the input, E8M0), both operands of a block-scaled MXFP8 GEMM; changes the weights",
    )
    p.add_argument(
        "--no-fusions",
        action="store_true",
        help="ort: keep RMSNorm, its residual Add and RoPE as the export wrote them (for an onnxruntime "
        "without the fused kernels SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, RotaryEmbedding)",
    )
    p.add_argument(
        "--decode-cache",
        choices=["in-place", "apart", "concat"],  # passes.pipelines.DecodeCache (imported when lowering)
        help="ort: how decode and MTP graphs meet their new cache entries. in-place (the default): written into "
        "the past buffer, which attention then reads once (outputs present_ckv.N / present_kpe.N, to be bound "
        "onto the past: dsv3c's runtimes do); apart: returned as new_ckv.N / new_kpe.N, attention over past and "
        "new apart (five more small nodes per layer); concat: returned, attention over the exported Concat of "
        "the two (a copy of the cache per step)",
    )
    p.add_argument(
        "--shared-experts-apart",
        action="store_true",
        help="ort: keep DeepSeekMoE's shared experts as MatMuls (MatMulNBits with --weights-8bit; by default a "
        "bf16 or float16 lowering runs them as always-chosen experts of com.microsoft::MoE or QMoE, which saves "
        "several kernels per layer)",
    )
    p.add_argument(
        "--dump-dir",
        type=Path,
        help="write every graph after every stage into this new folder (no weight data); it appears only when "
        "the lowering succeeds",
    )
    p.add_argument("--force", action="store_true", help="replace OUT (and the --dump-dir folder) if it exists")


def parse_dims(items: list[str]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in ",".join(items).split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit() or not 1 <= int(value) < 2**63:  # ONNX: int64
            raise UserError(f"--shape: '{item}' is not DIM=N with 1 <= N < 2^63 (e.g. --shape batch=1,seq=32)")
        dims[name.strip()] = int(value)
    return dims


def run(args: argparse.Namespace) -> int:
    from dsv3c.artifact.atomic import check_output
    from dsv3c.cli.stage_dumps import stage_dumps

    check_output(args.out, [args.export_dir], args.force)  # before any work: never over the input
    if args.dump_dir is not None:
        check_output(args.dump_dir, [args.export_dir, args.out], args.force)
    if args.no_fusions and args.target != "ort":
        raise UserError("--no-fusions keeps onnxruntime's fused ops out of the ort lowering; use it with --target ort")
    if args.decode_cache is not None and args.target != "ort":
        raise UserError("--decode-cache chooses the ort lowering's decode attention; use it with --target ort")
    if args.shared_experts_apart and args.target != "ort":
        raise UserError("--shared-experts-apart keeps the ort lowering's shared experts as MatMuls; use --target ort")
    if args.weights_8bit_scope != "all" and not args.weights_8bit:
        raise UserError("--weights-8bit-scope says what --weights-8bit stores in 8 bits; pass --weights-8bit too")
    if args.block_8bit != 128 and not args.weights_8bit:
        raise UserError("--block-8bit sets the block of --weights-8bit; pass --weights-8bit too")
    compile_for = _compile_target(args)
    with stage_dumps(args.dump_dir, args.force, [args.export_dir, args.out]) as dump_dir:
        manifest = _lower(args, dump_dir, compile_for)
    stage = manifest.stages[-1]
    extra = f" and {', '.join(stage['mlir'].values())}" if "mlir" in stage else ""
    if "vmfb" in stage and compile_for is not None:
        extra += f", {', '.join(stage['vmfb']['files'].values())} for {compile_for.describe()}"
    eight = ""
    if args.weights_8bit:
        eight = " with 8-bit experts" if args.weights_8bit_scope == "experts" else " with 8-bit weights"
    print(f"wrote {args.out}: {', '.join(r for r, f in manifest.graphs.items() if f)} for {args.target}{eight}{extra}")
    error = stage.get("error_vs_source", {})
    if error.get("measured"):
        print(
            f"error vs {args.export_dir} (seeded random inputs): logits {error['max_logits']:.2e} relative "
            f"(median token {error['max_median_token_logits']:.2e}), any output {error['max']:.2e}"
        )
    return 0


def _compile_target(args: argparse.Namespace) -> CompileTarget | None:
    """--backend / --gpu-target checked before the lowering starts (the cuda target is probed, ~1 s)."""
    if args.emit != "vmfb":
        if args.backend is not None or args.gpu_target is not None:
            raise UserError("--backend and --gpu-target choose what --emit vmfb compiles for; pass --emit vmfb too")
        return None
    if args.target != "iree":
        raise UserError("--emit vmfb compiles the iree lowering's MLIR; use it with --target iree")
    from dsv3c.passes.mlir import compile_target

    return compile_target(args.backend or ("cuda" if args.gpu_target else "llvm-cpu"), args.gpu_target)


def _lower(args: argparse.Namespace, dump_dir: Path | None, compile_for: CompileTarget | None) -> Manifest:
    from dsv3c.passes.lower import lower_folder
    from dsv3c.passes.pipelines import DecodeCache, Target

    return lower_folder(
        args.export_dir,
        args.out,
        Target(args.target),
        dims=parse_dims(args.shape) or None,
        emit_mlir=args.emit == "mlir",
        compile_for=compile_for,
        dump_dir=dump_dir,
        force=args.force,
        weights_8bit=args.block_8bit if args.weights_8bit else None,
        linears_8bit=args.weights_8bit_scope != "experts",
        mxfp8=args.activations == "mxfp8",
        mxfp8_weights=args.mxfp8_weights,
        ort_fusions=not args.no_fusions,
        decode_cache=DecodeCache(args.decode_cache) if args.decode_cache else DecodeCache.IN_PLACE,
        shared_experts_in_moe=not args.shared_experts_apart,
    )
