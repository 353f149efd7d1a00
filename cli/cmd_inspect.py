"""dsv3c inspect: what an ONNX model or an export folder holds (ops, parameters, custom nodes, FP8 coverage)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "summarize an ONNX model or export folder: ops, parameters by dtype, custom nodes, FP8 coverage, cache"
FORMATS = ("text", "json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, metavar="MODEL_OR_EXPORT_DIR", help="an .onnx file or a dsv3c export folder")
    p.add_argument("--format", choices=FORMATS, default="text")


def run(args: argparse.Namespace) -> int:
    from dsv3c.graph.inspect import find_handler
    from dsv3c.graph.render_json import render_json

    handler = find_handler(args.path)
    report = handler.call("inspect", args.path)
    print(render_json(report) if args.format == "json" else handler.call("render_text", report), end="")
    return 0
