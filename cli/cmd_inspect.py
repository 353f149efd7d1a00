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
    p.add_argument(
        "--placement",
        choices=["cpu", "cuda"],
        help="export folders: run one decode step on onnxruntime's CPU or CUDA provider (static shapes, batch 1) "
        "and count where its nodes ran; the folder needs weights",
    )


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
    if args.placement:
        return placement(args.path, args.placement, args.format)
    report = handler.call("inspect", args.path, **options)
    print(render_json(report) if args.format == "json" else handler.call("render_text", report), end="")
    return 0


def placement(folder: Path, device: str, fmt: str) -> int:
    """One decode step of `folder` at batch 1, capacity 256, profiled: nodes per execution provider."""
    import json

    import torch
    from dsv3c.runtime.ort_cuda_graph import StaticDecoder
    from dsv3c.runtime.ort_session import resolve_device

    if not (folder / "manifest.json").is_file():
        raise UserError(f"--placement runs an export folder's decode graph; {folder} has no manifest.json")
    if device == "cuda":
        resolve_device("cuda")  # one line when onnxruntime-gpu or the GPU is missing
    decoder = StaticDecoder(folder, 1, 1, device=device, cuda_graph=False, profile=True)
    ids = torch.zeros(1, 1, dtype=torch.long, device=decoder.device)
    decoder.step(ids, torch.zeros_like(ids))
    decoder.synchronize()
    found = decoder.placement()
    if fmt == "json":
        print(json.dumps({"provider": decoder.provider, **found.to_dict()}, indent=1))
        return 0
    total = sum(found.by_provider.values())
    print(f"decode.onnx, one step at batch 1 (capacity {decoder.capacity}) on {decoder.provider}: {total} nodes ran")
    for provider, count in sorted(found.by_provider.items(), key=lambda kv: -kv[1]):
        print(f"  {provider:<28}{count:>6}")
    if found.off_device:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(found.off_device.items(), key=lambda kv: -kv[1]))
        print(f"  not on {decoder.provider}: {ops}")
    return 0
