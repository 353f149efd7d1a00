"""dsv3c quantize: DeepSeek-style FP8 (128x128 weight blocks, 1x128 online activation tiles) on every graph."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from dsv3c.cli.args import calibration_batches, seed
from dsv3c.errors import UserError

if TYPE_CHECKING:
    from dsv3c.passes.pipelines import QuantizeOptions

HELP = "quantize an export folder to FP8 (DeepSeek's block scheme) into a new export folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="export folder written by 'dsv3c export'")
    p.add_argument("--out", required=True, type=Path, help="export folder to create")
    p.add_argument(
        "--policy",
        default="",
        metavar="PATTERNS",
        help="comma-separated fnmatch patterns on weight names, '+PAT' adds linears to FP8, '-PAT' "
        "keeps them high precision, applied in order after DeepSeek's default "
        "(e.g. '+*.o_proj,-model.layers.0.*'); write --policy=-PAT when the list starts "
        "with '-'",
    )
    p.add_argument("--pow2-scales", action="store_true", help="round activation scales up to powers of two")
    p.add_argument(
        "--calibrate",
        type=calibration_batches,
        default=0,
        metavar="N",
        help="static per-tensor activation scales from N batches (at most 1024): of --calibration-data text, "
        "else random ids",
    )
    p.add_argument(
        "--weight-scheme",
        choices=("block", "tensor"),
        default="block",
        help="block: one scale per 128x128 block (default); tensor: one per matrix",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="print per-layer error vs the unquantized graph, block next to per-tensor FP8",
    )
    p.add_argument("--dump-dir", type=Path, help="write every graph after every stage here (no weight data)")
    p.add_argument(
        "--calibration-data",
        type=Path,
        metavar="TEXT",
        help="with --calibrate: draw the batches from this text file or folder (tokenizer.json), not random ids",
    )
    p.add_argument(
        "--report-data",
        type=Path,
        metavar="TEXT",
        help="with --report: measure on this text (tokenizer.json) instead of random inputs, and add the loss delta",
    )
    p.add_argument("--report-format", choices=("text", "json", "html"), default="text", help="of --report")
    p.add_argument("--report-out", type=Path, metavar="FILE", help="write --report here instead of standard output")
    p.add_argument("--seed", type=seed, default=0, help="seed of the random calibration and report inputs")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from dsv3c.artifact.atomic import check_output
    from dsv3c.cli.stage_dumps import stage_dumps
    from dsv3c.passes.fp8_math import ActScheme, WeightScheme
    from dsv3c.passes.pipelines import QuantizeOptions
    from dsv3c.passes.policy import Policy
    from dsv3c.passes.quantize import quantize_folder

    check_output(args.out, [args.export_dir, args.calibration_data], args.force)  # before any work
    if (args.report_out is not None or args.report_format != "text") and not args.report:
        raise UserError("--report-format and --report-out shape the output of --report; pass --report too")
    if args.report_out is not None:
        from dsv3c.artifact.atomic import check_disjoint

        check_disjoint(args.report_out, [args.export_dir, args.out, args.calibration_data, args.report_data])
    if args.calibration_data is not None and not args.calibrate:
        raise UserError("--calibration-data gives the batches of --calibrate N; pass --calibrate too")
    args.calibration_text = None
    if args.calibration_data is not None:
        from dsv3c.eval.calibration import calibration_batches

        args.calibration_text = calibration_batches(args.export_dir, args.calibration_data, args.calibrate)
    if args.report_data is not None and not args.report:
        raise UserError("--report-data is the text of --report; pass --report too")
    args.report_text = None
    if args.report_data is not None:
        from dsv3c.eval.report_view import report_batches

        args.report_text = report_batches(args.export_dir, args.report_data)
    if args.report:
        from dsv3c.artifact.manifest import read_manifest

        if read_manifest(args.export_dir).weights == "none":
            raise UserError(f"--report runs the model, but {args.export_dir} has no weights (--weights none)")
    options = QuantizeOptions(
        policy=Policy.parse(args.policy),
        weights=WeightScheme(args.weight_scheme),
        activations=ActScheme.STATIC if args.calibrate else ActScheme.TILE,
        pow2_scales=args.pow2_scales,
    )
    with stage_dumps(args.dump_dir, args.force, [args.export_dir, args.out, args.calibration_data]) as dump_dir:
        manifest = quantize_folder(
            args.export_dir,
            args.out,
            options,
            calibrate=args.calibrate,
            seed=args.seed,
            calibration_text=args.calibration_text,
            dump_dir=dump_dir,
            force=args.force,
        )
    stage = manifest.stages[-1]
    counts = {role: c.get("fp8_weights", 0) for role, c in stage["changes"].get("fp8-weights", {}).items()}
    source = stage.get("calibration", {}).get("source", "")
    static = f", static activation scales from {args.calibrate} batches ({source})" if args.calibrate else ""
    kept = f", {len(stage['fp8_kept'])} fp8 weights kept as they were" if stage.get("fp8_kept") else ""
    print(f"wrote {args.out}: fp8 linears per graph {json.dumps(counts)}{kept}{static}")
    if args.report:
        _report(args, options)
    return 0


def _report(args: argparse.Namespace, options: QuantizeOptions) -> None:
    """Quantize again per-tensor (same activation mode: online or calibrated) and compare both."""
    import dataclasses

    from dsv3c.eval.record import run_record
    from dsv3c.eval.report_view import ReportView, loss_results, render
    from dsv3c.passes.fp8_math import ActScheme, WeightScheme
    from dsv3c.passes.quantize import quantize_folder
    from dsv3c.passes.report import compare_exports

    if options.weights != WeightScheme.BLOCK:
        raise UserError("--report compares block-wise with per-tensor FP8; leave --weight-scheme at block")
    activations = ActScheme.STATIC if options.activations == ActScheme.STATIC else ActScheme.TENSOR
    tensor_options = dataclasses.replace(options, weights=WeightScheme.TENSOR, activations=activations)
    with tempfile.TemporaryDirectory(prefix=".dsv3c-report-", dir=args.out.resolve().parent) as tmp:
        per_tensor = Path(tmp) / "per-tensor"
        quantize_folder(
            args.export_dir,
            per_tensor,
            tensor_options,
            calibrate=args.calibrate,
            seed=args.seed,
            calibration_text=args.calibration_text,
        )
        candidates = {"block fp8": args.out, "per-tensor fp8": per_tensor}
        report = compare_exports(args.export_dir, candidates, seed=args.seed, text=args.report_text)
        losses = loss_results(args.export_dir, candidates, args.report_text) if args.report_text else {}
        view = ReportView(report, "text" if args.report_text else "random", losses, run_record(args.argv))
    text = render(view, args.report_format)
    if args.report_out is None:
        print(text, end="")
    else:
        from dsv3c.artifact.atomic import write_text

        write_text(args.report_out, text, inputs=[args.export_dir, args.out])
        print(f"wrote {args.report_out}")
