"""Online activation scales -> MXFP8: the Q/DQ that computes its scale in the graph, rewritten.

`dsv3c quantize` (DeepSeek's recipe) quantizes the input of every FP8 linear per token and 128 channels
with a scale computed at run time (fp8_activations.py). TensorRT takes run-time scales only as its
dynamic quantization, and for FP8 only as MXFP8: blocks of 32 channels with E8M0 (power-of-two) scales.
This pass finds each online region (pattern -> check -> rewrite):

    pattern  h -> [Pad] -> [Reshape] -> QuantizeLinear(., s) -> DequantizeLinear(., s) -> [Reshape] -> [Slice] -> y
             with s computed in the graph (not a constant), the layout nodes made by the fp8 activation pass
    rewrite  y := MXFP8(h)  (mxfp8.py: TensorRT's ops, or the same numbers in standard ONNX ops)

and leaves the old region to the cleanup stages (dead code). Static (calibrated) scales stay as they are.

Mxfp8WeightsPass (optional, `--mxfp8-weights`) re-quantizes the FP8 weights those activations meet from
DeepSeek's 128x128 float-scaled blocks to MXFP8 (1x32 along the input dimension, E8M0 scales), so that
both GEMM operands are MXFP8, the form of a block-scaled MXFP8 GEMM. It changes the weights (a second
rounding, power-of-two scales); without it the weights keep their exact FP8 numbers.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.artifact.export_folder import mark_weight
from dsv3c.export.builder import Builder, initializer, static_dims
from dsv3c.passes.mxfp8 import (
    MX_BLOCK,
    TRT_DEQUANTIZE,
    TRT_DOMAIN,
    e8m0_bytes,
    mxfp8_emulated,
    mxfp8_trt,
    mxfp8_weight,
)
from dsv3c.passes.stages import DsPass, StageResult

_LAYOUT_IN = ("Pad", "Reshape")
_LAYOUT_OUT = ("Reshape", "Slice")


class Mxfp8Form(enum.Enum):
    TRT = "trt"  # trt::TRT_MXFP8DynamicQuantize + TRT_MXFP8DequantizeLinear (TensorRT's parser)
    EMULATED = "emulated"  # the same numbers in standard ONNX ops (onnxruntime, any runtime)


@dataclass(frozen=True)
class OnlineRegion:
    h: ir.Value  # the float32 activation the fp8 activation pass read
    y: ir.Value  # the dequantized activation the linears read
    quantize: ir.Node
    dequantize: ir.Node


def _constant(value: ir.Value | None) -> bool:
    if value is None or value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _from_activation_pass(node: ir.Node) -> bool:
    mark = provenance.read(node).rewrite
    return mark is not None and mark.kind == provenance.QUANTIZED and any("online" in d for d in mark.details)


def match(quantize: ir.Node) -> OnlineRegion | str:
    """The online region around `quantize`, or why it is not one (in words)."""
    if quantize.op_type != "QuantizeLinear" or quantize.domain not in ("", "ai.onnx"):
        return "not a QuantizeLinear"
    scale = quantize.inputs[1]
    if _constant(scale):
        return "its scale is a constant (static): TensorRT takes it as it is"
    users = [u for u, _ in quantize.outputs[0].uses()]
    if len(users) != 1 or users[0].op_type != "DequantizeLinear" or users[0].inputs[1] is not scale:
        return "its output is not dequantized with the same scale by one DequantizeLinear"
    h = quantize.inputs[0]
    assert h is not None
    while (p := h.producer()) is not None and p.op_type in _LAYOUT_IN and _from_activation_pass(p):
        if (source := p.inputs[0]) is None:
            break
        h = source
    y = users[0].outputs[0]
    while len(uses := list(y.uses())) == 1 and uses[0][0].op_type in _LAYOUT_OUT and _from_activation_pass(uses[0][0]):
        y = uses[0][0].outputs[0]
    if h.dtype != ir.DataType.FLOAT or h.shape is None or not isinstance(h.shape[-1], int):
        return f"its input {h.name} is not float32 with a static last dimension"
    if y.shape is None or y.shape[-1] != h.shape[-1] or len(y.shape) != len(h.shape):
        return f"its output {y.name} does not have the shape of its input {h.name}"
    return OnlineRegion(h, y, quantize, users[0])


class OnlineActivationsToMxfp8Pass(DsPass):
    """Every online activation Q/DQ -> MXFP8 (1x32 blocks, E8M0 scales) in `form`."""

    def __init__(self, form: Mxfp8Form) -> None:
        super().__init__()
        self.form = form

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        regions = [r for n in list(graph) if n.op_type == "QuantizeLinear" and isinstance(r := match(n), OnlineRegion)]
        for region in regions:
            self._rewrite(graph, region)
        if regions and self.form == Mxfp8Form.TRT:
            model.opset_imports.setdefault(TRT_DOMAIN, 1)
        changes = {"mxfp8_activations": len(regions), "form": self.form.value, "block": MX_BLOCK}
        return StageResult(model, bool(regions), changes)

    def _rewrite(self, graph: ir.Graph, region: OnlineRegion) -> None:
        detail = "TensorRT dynamic" if self.form == Mxfp8Form.TRT else "emulated"
        name = (region.quantize.name or "activation").removesuffix("/quantize")
        b = Builder(
            name + "/mxfp8",
            rewrite=provenance.quantized("mxfp8", f"1x{MX_BLOCK} blocks", "E8M0 scales", f"online ({detail})"),
            origin=[region.quantize, region.dequantize],
        )
        assert region.h.shape is not None
        rank, k = len(region.h.shape), int(region.h.shape[-1])  # type: ignore[arg-type]
        build = mxfp8_trt if self.form == Mxfp8Form.TRT else mxfp8_emulated
        out = build(b, region.h, rank, k)
        out.shape, out.dtype = region.y.shape, region.y.dtype or ir.DataType.FLOAT
        b.insert_before(graph, region.quantize)
        last = region.y.producer()
        region.y.replace_all_uses_with(out)
        _remove_dead_region(graph, last or region.dequantize)


def _remove_dead_region(graph: ir.Graph, start: ir.Node) -> None:
    """Remove the fp8 activation pass's nodes that nothing reads any more, from `start` backwards (so
    that later stages, which refuse online scales, do not see the replaced Q/DQ)."""
    pending = [start]
    while pending:
        node = pending.pop()
        if node.graph is not graph or not _from_activation_pass(node):
            continue
        if any(v.uses() or v.is_graph_output() for v in node.outputs):
            continue
        producers = [v.producer() for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        pending.extend(p for p in producers if p is not None)


_LAYOUT = ("Slice", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Pad", "Cast")


def _mxfp8_activation(value: ir.Value | None, depth: int = 0) -> bool:
    """Whether `value` is an MXFP8-dequantized activation (this pass's marks), through layout ops."""
    p = value.producer() if value is not None else None
    if p is None or depth > 4:
        return False
    mark = provenance.read(p).rewrite
    if mark is not None and mark.kind == provenance.QUANTIZED and mark.details[:1] == ("mxfp8",):
        return True
    return p.op_type in _LAYOUT and _mxfp8_activation(p.inputs[0], depth + 1)


def _meets_mxfp8(value: ir.Value) -> bool:
    """Whether `value` reaches (through layout ops) a MatMul whose other operand is an MXFP8 activation."""
    pending = [value]
    while pending:
        for user, index in pending.pop().uses():
            if user.op_type == "MatMul" and _mxfp8_activation(user.inputs[1 - index]):
                return True
            if user.op_type in _LAYOUT:
                pending.extend(user.outputs)
    return False


def _scale_source(value: ir.Value) -> tuple[ir.Value, int] | None:
    """DeepSeek's scale initializer [(E,) R, C] behind the expansion chain of a blocked weight DQ, and
    its rows per block."""
    rows = 0
    while not value.is_initializer():
        p = value.producer()
        if p is None or p.op_type not in ("Slice", "Reshape", "Expand", "Unsqueeze"):
            return None
        if p.op_type == "Expand" and p.inputs[1] is not None:
            tile = ir.convenience.get_const_tensor(p.inputs[1])
            rows = int(tile.numpy()[-2]) if tile is not None else 0
        if p.inputs[0] is None:
            return None
        value = p.inputs[0]
    return (value, rows) if rows and value.const_value is not None else None


class Mxfp8WeightsPass(DsPass):
    """FP8 weights (128x128 blocks) that meet MXFP8 activations -> MXFP8 weights (1x32, E8M0), in `form`."""

    def __init__(self, form: Mxfp8Form) -> None:
        super().__init__()
        self.form = form

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, done = model.graph, 0
        for node in list(graph):
            w = node.inputs[0] if node.op_type == "DequantizeLinear" and "block_size" in node.attributes else None
            if w is None or w.const_value is None or w.dtype != ir.DataType.FLOAT8E4M3FN or not w.name:
                continue
            width = static_dims(w.shape)[-1]
            found = _scale_source(node.inputs[1]) if node.inputs[1] is not None else None
            if found is None or width % MX_BLOCK or not _meets_mxfp8(node.outputs[0]):
                continue
            self._rewrite(graph, node, w, *found)
            done += 1
        return StageResult(model, bool(done), {"mxfp8_weights": done, "form": self.form.value})

    def _rewrite(self, graph: ir.Graph, node: ir.Node, w: ir.Value, source: ir.Value, rows: int) -> None:
        assert w.const_value is not None and source.const_value is not None and w.name
        dims, cols = static_dims(w.shape), node.attributes["block_size"].as_int()
        fp8, scales = w.const_value, source.const_value
        cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def requantized() -> tuple[np.ndarray, np.ndarray]:
            if "w" not in cache:
                s = np.repeat(np.repeat(np.asarray(scales.numpy(), np.float32), rows, -2), cols, -1)
                cache["w"] = mxfp8_weight(np.asarray(fp8.numpy(), np.float32) * s[..., : dims[-2], : dims[-1]])
            return cache["w"]

        def lazy(name: str, dtype: ir.DataType, shape: tuple[int, ...], get: Callable[[], np.ndarray]) -> ir.Value:
            tensor = ir.LazyTensor(lambda: ir.tensor(get(), dtype=dtype), dtype, ir.Shape(shape))
            return mark_weight(initializer(graph, name, tensor))

        sdims = (*dims[:-1], dims[-1] // MX_BLOCK)
        values = lazy(w.name + "_mxfp8", ir.DataType.FLOAT8E4M3FN, dims, lambda: requantized()[0])
        b = Builder(
            node.name or "dequantize", rewrite=provenance.quantized("mxfp8", "weights 1x32", "E8M0"), origin=node
        )
        if self.form == Mxfp8Form.TRT:
            exps = lazy(w.name + "_mxfp8_e8m0", ir.DataType.UINT8, sdims, lambda: e8m0_bytes(requantized()[1]))
            blocked = {"axis": -1, "block_size": MX_BLOCK}
            out = b.op(
                TRT_DEQUANTIZE,
                values,
                exps,
                name="mxfp8_weight",
                domain=TRT_DOMAIN,
                output_dtype=ir.DataType.FLOAT,
                **blocked,
            )
        else:
            scale = lazy(w.name + "_mxfp8_scale", ir.DataType.FLOAT, sdims, lambda: requantized()[1])
            out = b.op("DequantizeLinear", values, scale, name="mxfp8_weight", axis=-1, block_size=MX_BLOCK)
        out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape(dims)
        b.insert_before(graph, node)
        node.outputs[0].replace_all_uses_with(out)
        graph.remove(node, safe=True)
