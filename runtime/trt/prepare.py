"""From an export folder to what TensorRT's ONNX parser reads: lowering, inlining, checks that name the node.

    folder, how = lowered_folder(export_dir, scratch, lower=trt_lowering)   # the caller's lowering
    graph = load_for_parser(read_manifest(folder), "decode")
    parser.parse(graph.model_bytes, str(graph.path))       # external data resolves beside graph.path

The passes issue's `trt` lowering (MLA through opset-23 Attention, RoPE through RotaryEmbedding, constant
Q/DQ scales) runs first when dsv3c has it (`lowered_folder`, the one switch). Whatever remains is prepared
minimally: model-local functions (the reference bodies) are inlined, so no plugin lookup can happen
(TensorRT-RTX aborts the process on a node that maps to a registered Python plugin: docs/toolchain.md), and inlined
nodes are named after their call site (`layers.0/node_moe/TopK_15`) so that errors can name them. Weights
stay in weights.bin: the graph is serialized without them and the parser reads them from the folder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import onnx
import onnx.inliner
from dsv3c.artifact.manifest import Manifest, read_manifest
from dsv3c.errors import UserError

FP8_TYPES = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2}
# trt-domain ops TensorRT's ONNX parser builds into native layers (no plugin): dynamic MXFP8 quantization
TRT_BUILTINS = {("trt", "TRT_MXFP8DynamicQuantize"), ("trt", "TRT_MXFP8DequantizeLinear")}
_INLINED = re.compile(r"^(?P<name>.+)__(?P<call>\d+)$")


@dataclass(frozen=True)
class NodeRef:
    index: int
    name: str
    op_type: str

    def describe(self) -> str:
        return f"node {self.index} '{self.name}' ({self.op_type})"


@dataclass(frozen=True)
class ParserInput:
    role: str
    path: Path  # the graph file; its folder holds the external weights
    model_bytes: bytes  # the inlined graph without weight data
    nodes: list[NodeRef]
    has_fp8: bool  # FLOAT8 initializers (quantized weights)
    blocked_dq: list[NodeRef]  # DequantizeLinear nodes with block_size (named when a build fails on them)
    mxfp8: list[NodeRef] = field(default_factory=list)  # TensorRT dynamic MXFP8 quantize nodes (online scales)


# ---- lowering: the one switch between the passes issue's lowering and the minimal preparation -----------

Lowering = Literal["auto", "passes", "inline"]


def lowered_folder(
    folder: Path,
    scratch: Path,
    lowering: Lowering = "auto",
    lower: Callable[..., object] | None = None,
    mxfp8: bool = False,
) -> tuple[Path, str]:
    """The export folder to parse and how it was prepared.

    `lower(src, dst)` is the passes' `trt` lowering (`dsv3c lower --target trt`), given by the caller:
    runtime/ does not import passes/ (docs/architecture.md). auto: that lowering when given, else inline;
    passes: that lowering or a UserError; inline: only the minimal preparation of load_for_parser.
    `mxfp8`: online activation scales become TensorRT's dynamic MXFP8 (`lower(src, dst, mxfp8=True)`).
    """
    manifest = read_manifest(folder)
    lowered = [s.get("target") for s in manifest.stages if s.get("stage") == "lower"]
    if lowered and lowered[-1] != "trt":
        raise UserError(f"{folder} is lowered for {lowered[-1]}; build the canonical export or its trt lowering")
    if lowered:
        return folder, "lowered for trt before the build"
    if lowering == "inline" or lower is None:
        if lowering == "passes":
            raise UserError("--lowering passes: no trt lowering was given to the build")
        return folder, "inline: local functions inlined" + ("" if lowering == "inline" else " (no trt lowering given)")
    out = scratch / "lowered-trt"
    if mxfp8:
        lower(folder, out, mxfp8=True)
        return out, "dsv3c lower --target trt --activations mxfp8"
    lower(folder, out)
    return out, "dsv3c lower --target trt"


# ---- one graph -----------------------------------------------------------------------------------------


def load_for_parser(manifest: Manifest, role: str) -> ParserInput:
    """The graph of `role` inlined and checked; UserError naming the node TensorRT could not take."""
    path = manifest.graph_path(role)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several types; one line
        raise UserError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    model = _inline(model)
    nodes = [
        NodeRef(i, n.name or f"#{i}", f"{n.domain}::{n.op_type}" if n.domain else n.op_type)
        for i, n in enumerate(model.graph.node)
    ]
    _check(model, path, nodes)
    has_fp8 = any(t.data_type in FP8_TYPES for t in model.graph.initializer)
    blocked = [ref for ref, n in zip(nodes, model.graph.node, strict=True) if _blocked_dq(n)]
    mxfp8 = [ref for ref in nodes if ref.op_type == "trt::TRT_MXFP8DynamicQuantize"]
    return ParserInput(role, path, model.SerializeToString(), nodes, has_fp8, blocked, mxfp8)


def online_scale_node(manifest: Manifest) -> str | None:
    """The first QuantizeLinear whose scale the graph computes (online activation scales), described
    with its graph, or None. Reads the graph files only (the fp8 activation Q/DQ sit in the main graph)."""
    for role in (r for r, f in manifest.graphs.items() if f):
        path = manifest.graph_path(role)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf raises several types; one line
            raise UserError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
        constant = {t.name for t in model.graph.initializer}
        constant.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
        for n in model.graph.node:
            if n.op_type == "QuantizeLinear" and len(n.input) > 1 and n.input[1] not in constant:
                return f"{path.name}: node '{n.name}'"
    return None


def _blocked_dq(n: onnx.NodeProto) -> bool:
    return n.op_type == "DequantizeLinear" and any(a.name == "block_size" and a.i for a in n.attribute)


def _inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline model-local functions; inlined nodes are named '{call site}/{op}_{k}'."""
    if not model.functions:
        return model
    local = {(f.domain, f.name) for f in model.functions}
    calls = [n.name or f"{n.op_type}" for n in model.graph.node if (n.domain, n.op_type) in local]
    for f in model.functions:
        for k, n in enumerate(f.node):
            n.name = n.name or f"{n.op_type}_{k}"
    inlined = onnx.inliner.inline_local_functions(model)
    for n in inlined.graph.node:
        m = _INLINED.match(n.name)
        if m and 0 < int(m["call"]) <= len(calls):  # onnx.inliner suffixes '__{call number}'
            n.name = f"{calls[int(m['call']) - 1]}/{m['name']}"
    return inlined


def _check(model: onnx.ModelProto, path: Path, nodes: list[NodeRef]) -> None:
    """What TensorRT cannot build, found before the parser: custom nodes, fp8 casts, computed Q/DQ scales."""
    constant = {t.name for t in model.graph.initializer}
    for ref, n in zip(nodes, model.graph.node, strict=True):
        where = f"{path.name}: {ref.describe()}"
        if n.domain not in ("", "ai.onnx") and (n.domain, n.op_type) not in TRT_BUILTINS:
            raise UserError(
                f"{where} has no reference body to inline; TensorRT-RTX cannot host plugins, "
                "so lower it first (dsv3c lower --target trt)"
            )
        if n.op_type == "Cast" and any(a.name == "to" and a.i in FP8_TYPES for a in n.attribute):
            raise UserError(f"{where} casts to fp8; TensorRT takes fp8 only from QuantizeLinear (use Q/DQ)")
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1 and n.input[1] not in constant:
            raise UserError(
                f"{where} has a scale computed in the graph ({n.input[1]}); TensorRT needs build-time constant "
                "Q/DQ scales: quantize with static activation scales (dsv3c quantize --calibrate N), or let dsv3c "
                "lower them to MXFP8 (--lowering auto, --target-cc 12.0,12.1)"
            )
        foldable = n.op_type == "Constant" or all(i in constant for i in n.input if i)
        if foldable and n.op_type not in ("Shape", "Size"):  # its outputs count as constants
            constant.update(o for o in n.output if o)
