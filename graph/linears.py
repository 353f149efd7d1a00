"""Find the linear layers of a graph and how they are quantized.

A linear is a MatMul/Gemm whose weight input is computed from initializers only (the initializer itself,
or a Transpose / DequantizeLinear / Reshape-Mul chain over it), or a MoE node (dsv3c::MoE,
com.microsoft::MoE / QMoE) whose rank-3 inputs are expert weights. Its weight runs in FP8 when the
weight initializer is a float8 type; its activation is quantized when a QuantizeLinear to float8 (or a
Cast to float8) sits on the path into the linear's data input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx
from dsv3c.graph.index import GraphIndex
from onnx import TensorProto

FP8_TYPES = frozenset(
    {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ}
)
_FLOATS = FP8_TYPES | {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
# ops that may sit between a weight initializer and the linear (constant subgraph of the weight)
_WEIGHT_PATH = frozenset(
    {"Transpose", "Cast", "CastLike", "DequantizeLinear", "Reshape", "Mul", "Div", "Identity", "Squeeze",
     "Unsqueeze", "Flatten", "Expand", "Tile", "Concat", "Constant"}
)  # fmt: skip
# ops that may sit between an activation's online quantization and the linear
_ACT_PATH = frozenset(
    {"DequantizeLinear", "QuantizeLinear", "Reshape", "Cast", "Mul", "Div", "Transpose", "Identity", "Squeeze",
     "Unsqueeze", "Flatten"}
)  # fmt: skip
_MOE_OPS = frozenset({"MoE", "QMoE"})
_MAX_DEPTH = 12


@dataclass(frozen=True)
class Trace:
    """The constant subgraph behind a tensor: the initializers it reads and the nodes on the way."""

    initializers: frozenset[str]
    nodes: frozenset[int]


@dataclass(frozen=True)
class Linear:
    node: int
    weights: tuple[str, ...]  # one for MatMul/Gemm, the expert weights for MoE
    flops: float  # per token: 2 * in * out, experts weighted by top_k / n_experts
    weight_dtype: str
    fp8_weight: bool
    fp8_activation: bool  # MoE: the kernel quantizes its own activations when its weights are fp8
    scheme: str  # "fp8, block 128", "fp8, per-tensor", ... ; "" for a high-precision weight
    trace_nodes: frozenset[int]  # nodes of the weights' constant subgraphs

    @property
    def runs_fp8(self) -> bool:
        return self.fp8_weight and self.fp8_activation


def short_name(weight: str) -> str:
    """`model.layers.3.self_attn.q_a_proj.weight` -> `self_attn.q_a_proj`."""
    name = weight
    for prefix in ("model.layers.", "layers."):
        if name.startswith(prefix):
            name = name[len(prefix) :].split(".", 1)[-1]
    for suffix in (".weight", "_fp8", ".weight_fp8"):
        name = name.removesuffix(suffix)
    return name


def fp8_label(elem_type: int) -> str:
    return "fp8" if elem_type == TensorProto.FLOAT8E4M3FN else onnx.helper.tensor_dtype_to_string(elem_type).lower()


class LinearFinder:
    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self._memo: dict[str, Trace | None] = {}

    def trace(self, tensor: str, depth: int = 0) -> Trace | None:
        """The constant subgraph producing `tensor`, or None when it depends on a graph input."""
        if tensor in self._memo:
            return self._memo[tensor]
        index, result = self.index, None
        if tensor in index.initializers:
            result = Trace(frozenset({tensor}), frozenset())
        elif tensor in index.producer and depth < _MAX_DEPTH:
            i = index.producer[tensor][0]
            node = index.nodes[i]
            if node.op_type in _WEIGHT_PATH and node.domain in ("", "ai.onnx"):
                parts = [self.trace(name, depth + 1) for name in node.input if name]
                if all(p is not None for p in parts):
                    inits = frozenset().union(*(p.initializers for p in parts if p))
                    nodes = frozenset({i}).union(*(p.nodes for p in parts if p))
                    result = Trace(inits, nodes)
        self._memo[tensor] = result
        return result

    def _weight(self, trace: Trace) -> onnx.TensorProto | None:
        inits = [self.index.initializers[n] for n in trace.initializers]
        floats = [t for t in inits if t.data_type in _FLOATS and len(t.dims) >= 2]
        return max(floats, key=lambda t: (math.prod(t.dims), t.name), default=None)

    def _scheme(self, weight: onnx.TensorProto, trace: Trace) -> str:
        if weight.data_type not in FP8_TYPES:
            return ""
        label = fp8_label(weight.data_type)
        index = self.index
        scales = [
            t for n in trace.initializers if (t := index.initializers[n]) is not weight and t.data_type in _FLOATS
        ]
        for i in trace.nodes:
            node = index.nodes[i]
            if node.op_type == "DequantizeLinear":
                block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
                if block:
                    return f"{label}, block {block}"
        scale = max(scales, key=lambda t: math.prod(t.dims), default=None)
        if scale is None:
            return f"{label}, no scale"
        return f"{label}, {_granularity(tuple(weight.dims), tuple(scale.dims))}"

    def _activation_fp8(self, tensor: str) -> bool:
        index, seen, todo = self.index, set(), [(tensor, 0)]
        while todo:
            name, depth = todo.pop()
            if name in seen or name not in index.producer or depth > 8:
                continue
            seen.add(name)
            node = index.nodes[index.producer[name][0]]
            if node.op_type == "Cast" and any(a.name == "to" and a.i in FP8_TYPES for a in node.attribute):
                return True
            if node.op_type == "QuantizeLinear" and self._quantizes_to_fp8(node):
                return True
            if node.op_type in _ACT_PATH:
                todo += [(n, depth + 1) for n in node.input[:2] if n and n not in index.initializers]
        return False

    def _quantizes_to_fp8(self, node: onnx.NodeProto) -> bool:
        if any(a.name == "output_dtype" and a.i in FP8_TYPES for a in node.attribute):
            return True
        types = self.index.elem_types
        zero_point = node.input[2] if len(node.input) > 2 else ""
        return types.get(zero_point) in FP8_TYPES or types.get(node.output[0]) in FP8_TYPES

    def find(self) -> list[Linear]:
        found = []
        for i, node in enumerate(self.index.nodes):
            if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and len(node.input) > 1:
                linear = self._matmul(i, node)
            elif node.op_type in _MOE_OPS:
                linear = self._moe(i, node)
            else:
                continue
            if linear is not None:
                found.append(linear)
        return found

    def _matmul(self, i: int, node: onnx.NodeProto) -> Linear | None:
        trace = self.trace(node.input[1])
        weight = self._weight(trace) if trace else None
        if weight is None or trace is None:
            return None
        fp8 = weight.data_type in FP8_TYPES
        return Linear(i, (weight.name,), 2.0 * math.prod(weight.dims), _dtype(weight.data_type), fp8,
                      self._activation_fp8(node.input[0]), self._scheme(weight, trace), trace.nodes)  # fmt: skip

    def _moe(self, i: int, node: onnx.NodeProto) -> Linear | None:
        top_k = next((a.i for a in node.attribute if a.name in ("top_k", "k")), 1)
        experts, nodes, flops, scheme = [], frozenset[int](), 0.0, ""
        for name in node.input[1:]:
            trace = self.trace(name) if name else None
            weight = self._weight(trace) if trace else None
            if weight is None or trace is None or len(weight.dims) != 3:
                continue
            experts.append(weight)
            nodes |= trace.nodes
            flops += 2.0 * math.prod(weight.dims) * top_k / max(weight.dims[0], 1)
            scheme = scheme or self._scheme(weight, trace)
        if not experts:
            return None
        fp8 = all(w.data_type in FP8_TYPES for w in experts)
        return Linear(i, tuple(w.name for w in experts), flops, _dtype(experts[0].data_type), fp8, fp8,
                      scheme if fp8 else "", nodes)  # fmt: skip


def _dtype(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()


def _granularity(weight: tuple[int, ...], scale: tuple[int, ...]) -> str:
    """Name the scale layout: per-tensor, per-channel, or the block size that maps `weight` onto `scale`."""
    dims = [d for d in scale if d != 1]
    if not dims:
        return "per-tensor"
    if len(dims) == 1 and dims[0] in weight:
        return "per-channel"
    if len(scale) != len(weight):
        return f"scale {list(scale)}"
    blocks = {math.ceil(w / s) for w, s in zip(weight, scale, strict=True) if s not in (0, w)}
    if len(blocks) == 1:
        return f"block {blocks.pop()}"
    return "block " + "x".join(str(math.ceil(w / max(s, 1))) for w, s in zip(weight, scale, strict=True))


def find_linears(index: GraphIndex) -> list[Linear]:
    return LinearFinder(index).find()
