"""dsv3c diff: structural (and optionally numeric) diff of two ONNX graphs or two export folders.

Exit codes follow diff(1): 0 no differences, 1 differences found, 2 bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from dsv3c.cli.args import seed
from dsv3c.errors import UserError

if TYPE_CHECKING:
    from dsv3c.graph.diff_types import DiffReport

HELP = "compare two ONNX graphs or export folders: matched nodes, rewrites per layer, initializers, --numeric errors"
FORMATS = ("text", "json", "html")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", type=Path, metavar="A", help="an .onnx file or an export folder")
    p.add_argument("b", type=Path, metavar="B", help="the same kind as A")
    p.add_argument("--format", choices=FORMATS, default="text")
    p.add_argument("--out", type=Path, help="write the report here instead of standard output")
    p.add_argument(
        "--numeric",
        action="store_true",
        help="run both graphs (onnxruntime, seeded inputs) and compare every shared tensor",
    )
    p.add_argument("--seed", type=seed, default=0, help="seed of the --numeric inputs")
    p.add_argument(
        "--data",
        type=Path,
        metavar="TEXT",
        help="with --numeric: feed token windows of this text (A's tokenizer.json) instead of random ids, and, for "
        "two export folders, add B's loss on it against A's",
    )
    p.add_argument(
        "--no-values", action="store_true", help="compare initializers by dtype and shape only (never read weight data)"
    )


def _render(report: DiffReport, fmt: str) -> str:
    if fmt == "html":
        from dsv3c.graph.render_html import render_html

        return render_html(report)
    if fmt == "json":
        from dsv3c.graph.render_json import render_json

        return render_json(report)
    from dsv3c.graph.render_text import render_diff

    return render_diff(report)


def run(args: argparse.Namespace) -> int:
    from dsv3c.artifact.atomic import check_disjoint, write_text
    from dsv3c.graph.diff import diff_paths

    if args.out is not None:
        check_disjoint(args.out, [args.a, args.b])  # before the work: a report never replaces an input
    if args.data is not None and not args.numeric:
        raise UserError("--data is the text of --numeric; pass --numeric too")
    given, batches = {}, []
    if args.data is not None:
        if not (args.a.is_dir() and args.b.is_dir()):
            raise UserError("--data needs two export folders (their tokenizer.json and manifests); got files")
        from dsv3c.eval.report_view import report_batches

        batches = report_batches(args.a, args.data)
        given = {"input_ids": batches[0], "next_ids": batches[0]}
    report = diff_paths(
        args.a, args.b, numeric=args.numeric, values=not args.no_values, seed=args.seed, given=given or None
    )
    if batches:
        from dsv3c.eval.report_view import loss_results
        from dsv3c.graph.diff_types import LossDelta

        report.inputs = f"text: {args.data}"
        result = loss_results(args.a, {"B": args.b}, batches)["B"]
        c = result.comparison
        assert c is not None
        report.loss = LossDelta(
            result.tokens, c.reference_loss, result.loss, c.rel_loss_error, c.top1_agreement, c.kl_mean
        )
    text = _render(report, args.format)
    if args.out is None:
        print(text, end="")
    else:
        try:
            write_text(args.out, text)  # a temporary sibling, renamed: never half a report
        except OSError as e:
            raise UserError(f"{args.out}: cannot write the report ({e.strerror})") from None
        differences = sum(g.differences for g in report.graphs) + len(report.only_a) + len(report.only_b)
        print(f"wrote {args.out}: " + ("no differences" if report.identical else f"{differences} differences"))
    return 0 if report.identical else 1
