"""dsv3c inspect: what an ONNX model or an export folder holds (ops, parameters, custom nodes, FP8 coverage)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dsv3c.errors import UserError

HELP = "summarize an ONNX model, export folder or engine folder: ops, parameters, custom nodes, FP8 coverage, cache"
FORMATS = ("text", "json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, metavar="MODEL_OR_EXPORT_DIR", help="an .onnx file or a dsv3c export folder")
    p.add_argument("--format", choices=FORMATS, default="text")
    p.add_argument("--target-cc", metavar="CC[,CC]", help="engine folders: check validity for these GPUs")


def run(args: argparse.Namespace) -> int:
    from dsv3c.cli.inspect_kinds import find_handler
    from dsv3c.graph.render_json import render_json

    handler = find_handler(args.path)
    options = {}
    if args.target_cc:
        if "target_cc" not in handler.options:
            raise UserError(f"--target-cc applies to TensorRT engine folders; {args.path} is an {handler.kind}")
        # any capability may be asked about: the report says which the engines cannot run on
        options["target_cc"] = [cc.strip() for cc in args.target_cc.split(",") if cc.strip()]
    report = handler.call("inspect", args.path, **options)
    print(render_json(report) if args.format == "json" else handler.call("render_text", report), end="")
    return 0
