"""dsv3c build: one TensorRT engine per graph of an export folder, with engine_manifest.json beside them."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "build TensorRT engines (TensorRT-RTX builds without a GPU) from an export folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="a folder written by dsv3c export/quantize")
    p.add_argument("--out", required=True, type=Path, metavar="ENGINE_DIR", help="engine folder to create")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp8"),
        help="check the graphs' precision (default: what they hold; networks are strongly typed)",
    )
    p.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="[ROLE:]NAME=MIN,OPT,MAX",
        help="optimization profile range for a dimension (batch, seq, q, past) or an input "
        "(shapes as 1x0x64); repeatable. Example: decode:past=0,256,4096",
    )
    p.add_argument("--timing-cache", type=Path, metavar="FILE", help="read and update this timing cache")
    p.add_argument(
        "--target-cc",
        metavar="CC,...",
        help="compute capabilities to build for, e.g. 8.9,12.0 (TensorRT-RTX; default: its whole set). An export "
        "with online activation scales (the default of dsv3c quantize) builds as MXFP8 and needs 12.0/12.1",
    )
    p.add_argument(
        "--lowering",
        choices=("auto", "passes", "inline"),
        default="auto",
        help="auto: `dsv3c lower --target trt` when available, else inline the reference bodies",
    )
    p.add_argument("--roles", metavar="ROLE,...", help="build only these graphs (prefill, decode, mtp)")
    p.add_argument("--force", action="store_true", help="replace ENGINE_DIR if it exists")


def trt_lowering(src: Path, dst: Path, mxfp8: bool = False) -> object:
    """`dsv3c lower --target trt [--activations mxfp8]` (dsv3c.passes), handed to the build: runtime/ does
    not import passes/. The build asks for mxfp8 when the export computes activation scales online."""
    from dsv3c.passes.lower import lower_folder
    from dsv3c.passes.pipelines import Target

    return lower_folder(src, dst, Target.TRT, mxfp8=mxfp8)


def run(args: argparse.Namespace) -> int:
    from dsv3c.artifact.atomic import check_output
    from dsv3c.runtime.trt.backend import parse_cc_list
    from dsv3c.runtime.trt.build import BuildOptions, build_engines
    from dsv3c.runtime.trt.profiles import parse_profile_args

    check_output(args.out, [args.export_dir], args.force)  # before any work: never over the input
    options = BuildOptions(
        precision=args.precision,
        profiles=parse_profile_args(args.profile),
        timing_cache=args.timing_cache,
        target_cc=parse_cc_list(args.target_cc) if args.target_cc else [],
        roles=[r.strip() for r in args.roles.split(",") if r.strip()] if args.roles else None,
        force=args.force,
        lowering=args.lowering,
        lower_for_trt=trt_lowering,
    )
    manifest = build_engines(args.export_dir, args.out, options)
    total = sum(e.bytes for e in manifest.engines.values()) / 2**20
    seconds = sum(e.build_seconds for e in manifest.engines.values())
    print(
        f"wrote {args.out} ({len(manifest.engines)} engines, {total:.1f} MiB, {manifest.precision}, "
        f"built in {seconds:.2f} s)"
    )
    return 0
