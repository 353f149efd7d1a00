"""dsv3c export: canonical ONNX graphs (prefill, decode, MTP) with the latent cache as I/O, plus manifest.json."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dsv3c.errors import UserError
from dsv3c.models.config import preset_names

if TYPE_CHECKING:
    from dsv3c.artifact.manifest import Manifest, WeightsKind
    from dsv3c.export.source import Source

NAME = "export"
HELP = "export a checkpoint (or a config / preset) to ONNX graphs with MLA and MoE custom ops"
WEIGHTS = ("checkpoint", "random", "none")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        nargs="?",
        type=Path,
        help="checkpoint folder (config.json + safetensors), or one with only config.json",
    )
    p.add_argument("--preset", help=f"export a preset's topology instead: {', '.join(preset_names())}")
    p.add_argument("--out", required=True, type=Path, help="export folder to create")
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        default=None,
        help="checkpoint: the folder's weights (default when it has some); random: init_random's "
        "weights for --seed; none: declare every weight, write no data (structure only)",
    )
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight and activation dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of --weights random (same seed, same bytes)")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset, 21 to 23 (default 21)")
    p.add_argument(
        "--format",
        choices=("onnx", "mlir"),
        default="onnx",
        help="mlir: the iree lowering, then {role}.mlir through IREE's ONNX importer",
    )
    p.add_argument(
        "--fp8",
        choices=("keep", "dequantize"),
        default="keep",
        help="an FP8 checkpoint's weights: keep (default: FP8 bytes and their scales as they are, "
        "dequantized in the graph) or dequantize (stored in --dtype)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _export_mlir(source: Source, args: argparse.Namespace, weights: WeightsKind) -> Manifest:
    """The canonical export into a temporary folder, then the same pipeline as `dsv3c lower --target iree
    --emit mlir` into OUT: one path to MLIR, not two."""
    from dsv3c.export.exporter import export
    from dsv3c.passes.lower import lower_folder
    from dsv3c.passes.pipelines import Target

    parent = args.out.resolve().parent
    if not parent.is_dir():
        raise UserError(f"{args.out}: parent folder {parent} does not exist")
    with tempfile.TemporaryDirectory(prefix=f".{args.out.name}.{os.getpid()}.", suffix=".partial", dir=parent) as tmp:
        canonical = Path(tmp) / "canonical"
        export(source, canonical, weights=weights, dtype=args.dtype, seed=args.seed, opset=args.opset, fp8=args.fp8)
        return lower_folder(canonical, args.out, Target.IREE, emit_mlir=True, force=args.force)


def run(args: argparse.Namespace) -> int:
    from dsv3c.artifact.atomic import check_output
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder, from_preset

    if (args.checkpoint is None) == (args.preset is None):
        raise UserError("give either a checkpoint folder or --preset NAME (not both)")
    check_output(args.out, [args.checkpoint], args.force)  # before any work: never over an input
    source = from_preset(args.preset) if args.preset else from_folder(args.checkpoint)
    weights: WeightsKind | None = args.weights or ("checkpoint" if source.has_weights else None)
    if weights is None:
        raise UserError(f"{source.name} has no weights; pass --weights random or --weights none")
    start = time.perf_counter()
    if args.format == "mlir":
        manifest = _export_mlir(source, args, weights)
    else:
        manifest = export(
            source,
            args.out,
            weights=weights,
            dtype=args.dtype,
            seed=args.seed,
            opset=args.opset,
            force=args.force,
            fp8=args.fp8,
        )
    mlir = [f"{role}.mlir" for role in manifest.graphs if (args.out / f"{role}.mlir").is_file()]
    graphs = ", ".join([f for f in manifest.graphs.values() if f] + mlir)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(
        f"wrote {args.out}: {graphs}, weights {weights} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s"
    )
    return 0
