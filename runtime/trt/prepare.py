"""From an export folder to what TensorRT's ONNX parser reads: lowering, inlining, checks that name the node.

    folder, how = lowered_folder(export_dir, scratch, lower=trt_lowering)   # the caller's lowering
    graph = load_for_parser(read_manifest(folder), "decode")
    parser.parse(graph.model_bytes, str(graph.path))       # external data resolves beside graph.path

The passes issue's `trt` lowering (MLA through opset-23 Attention, RoPE through RotaryEmbedding, constant
Q/DQ scales) runs first when dsv3c has it (`lowered_folder`, the one switch). Whatever remains is prepared
minimally: model-local functions (the reference bodies) are inlined by the one inliner
(`onnxkit/inline.py`, on onnx_ir), so no plugin lookup can happen (TensorRT-RTX aborts the process on a node
that maps to a registered Python plugin: docs/toolchain.md), and inlined nodes are named after their call site
and place in the body (`layers.0/node_moe/TopK_15`) so that errors can name them; they carry the inliner's
provenance marks (node metadata, which the parser ignores). Weights stay in weights.bin: the graph is
serialized with references to them and the parser reads them from the folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import onnx_ir as ir
from dsv3c.artifact.manifest import Manifest, read_manifest
from dsv3c.errors import UserError
from dsv3c.onnxkit.inline import inline_call

FP8_TYPES = {ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2}
# trt-domain ops TensorRT's ONNX parser builds into native layers (no plugin): dynamic MXFP8 quantization
TRT_BUILTINS = {("trt", "TRT_MXFP8DynamicQuantize"), ("trt", "TRT_MXFP8DequantizeLinear")}
_STANDARD = ("", "ai.onnx")


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
    model = _load(path)
    _inline(model, path)
    graph = model.graph
    nodes = [
        NodeRef(i, n.name or f"#{i}", f"{n.domain}::{n.op_type}" if n.domain else n.op_type)
        for i, n in enumerate(graph)
    ]
    _check(graph, path, nodes)
    has_fp8 = any(v.dtype in FP8_TYPES for v in graph.initializers.values())
    blocked = [ref for ref, n in zip(nodes, graph, strict=True) if _blocked_dq(n)]
    mxfp8 = [ref for ref in nodes if ref.op_type == "trt::TRT_MXFP8DynamicQuantize"]
    # external tensors serialize as references to the weights file: the parser reads them beside `path`
    model_bytes = ir.serde.serialize_model(model).SerializeToString()
    return ParserInput(role, path, model_bytes, nodes, has_fp8, blocked, mxfp8)


def online_scale_node(manifest: Manifest) -> str | None:
    """The first QuantizeLinear whose scale the graph computes (online activation scales), described
    with its graph, or None. Reads the graph files only (the fp8 activation Q/DQ sit in the main graph)."""
    for role in (r for r, f in manifest.graphs.items() if f):
        path = manifest.graph_path(role)
        graph = _load(path).graph
        constant = set(graph.initializers.values())
        constant.update(o for n in graph if n.op_type == "Constant" for o in n.outputs)
        for n in graph:
            if n.op_type == "QuantizeLinear" and len(n.inputs) > 1 and n.inputs[1] not in constant:
                return f"{path.name}: node '{n.name}'"
    return None


def _load(path: Path) -> ir.Model:
    """The graph file as an ir.Model; external weights stay on disk (never read here)."""
    try:
        return ir.load(path)
    except Exception as e:  # protobuf raises several types; one line
        raise UserError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None


def _blocked_dq(n: ir.Node) -> bool:
    block = n.attributes.get("block_size")
    return n.op_type == "DequantizeLinear" and block is not None and bool(block.value)


def _inline(model: ir.Model, path: Path) -> None:
    """Inline model-local functions in place (nested calls too); inlined nodes are named '{call site}/{op}_{k}'
    (k: the node's place in the body) unless the body names them."""
    if not model.functions:
        return
    for function in model.functions.values():
        for k, n in enumerate(function):
            n.name = n.name or f"{n.op_type}_{k}"
    while calls := [n for n in model.graph if n.op_identifier() in model.functions]:
        for call in calls:
            try:
                inline_call(model.graph, call, model.functions[call.op_identifier()], prefix=call.name or call.op_type)
            except NotImplementedError as e:
                raise UserError(f"{path.name}: {e}") from None
    model.functions.clear()


def _check(graph: ir.Graph, path: Path, nodes: list[NodeRef]) -> None:
    """What TensorRT cannot build, found before the parser: custom nodes, fp8 casts, computed Q/DQ scales."""
    constant: set[ir.Value | None] = set(graph.initializers.values())
    for ref, n in zip(nodes, graph, strict=True):
        where = f"{path.name}: {ref.describe()}"
        if n.domain not in _STANDARD and (n.domain, n.op_type) not in TRT_BUILTINS:
            raise UserError(
                f"{where} has no reference body to inline; TensorRT-RTX cannot host plugins, "
                "so lower it first (dsv3c lower --target trt)"
            )
        to = n.attributes.get("to")
        if n.op_type == "Cast" and to is not None and to.value in FP8_TYPES:
            raise UserError(f"{where} casts to fp8; TensorRT takes fp8 only from QuantizeLinear (use Q/DQ)")
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.inputs) > 1 and n.inputs[1] not in constant:
            scale = n.inputs[1]
            raise UserError(
                f"{where} has a scale computed in the graph ({scale.name if scale is not None else ''}); TensorRT "
                "needs build-time constant Q/DQ scales: quantize with static activation scales (dsv3c quantize "
                "--calibrate N), or let dsv3c lower them to MXFP8 (--lowering auto, --target-cc 12.0,12.1)"
            )
        foldable = n.op_type == "Constant" or all(v in constant for v in n.inputs if v is not None)
        if foldable and n.op_type not in ("Shape", "Size"):  # its outputs count as constants
            constant.update(n.outputs)
