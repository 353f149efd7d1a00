"""Find the linear layers of a graph and how they are quantized, from the graph's structure alone.

A linear is
- a MatMul/Gemm whose weight input is computed from initializers only: the initializer itself, or a
  constant subgraph over it (Transpose, a weight DequantizeLinear whose scales are expanded by
  Unsqueeze/Expand/Reshape/Slice, a Cast, ...);
- a weight that a custom node reads (dsv3c::MLAAttention's kv_b_proj, a MoE's router): a rank-2
  initializer behind such a constant subgraph, at an input other than the first (the activation);
- the expert weights of a MoE node (dsv3c::MoE, com.microsoft::MoE / QMoE): its rank-3 inputs, one
  linear for all of them.
Its weight is fp8 when the weight initializer is a float8 type (the scales are the initializers read at
a DequantizeLinear's scale input). Its activation is quantized when a QuantizeLinear to float8 (or a Cast
to float8) sits on the path into a MatMul's data input; a custom node reads its activation itself, so its
fp8 weights are weight-only (the reference body and onnxruntime's MoE kernel dequantize them).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import onnx
from dsv3c.artifact.names import DOMAIN
from dsv3c.graph.index import GraphIndex, is_custom
from dsv3c.graph.load import dtype_name
from onnx import TensorProto

FP8_TYPES = frozenset(
    {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ}
)
_FLOATS = FP8_TYPES | {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
# ops that may sit between a weight initializer and the linear (constant subgraph of the weight)
WEIGHT_PATH = frozenset(
    {
        "Transpose",
        "Cast",
        "CastLike",
        "DequantizeLinear",
        "Reshape",
        "Mul",
        "Div",
        "Identity",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Expand",
        "Tile",
        "Concat",
        "Constant",
        "Slice",
        "Split",
    }
)
# ops that may sit between an activation's online quantization and the linear
_ACT_PATH = frozenset(
    {
        "DequantizeLinear",
        "QuantizeLinear",
        "Reshape",
        "Cast",
        "Mul",
        "Div",
        "Transpose",
        "Identity",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Slice",
        "Pad",
    }
)
MOE_OPS = frozenset({"MoE", "QMoE"})
_MAX_DEPTH = 12


@dataclass(frozen=True)
class Trace:
    """The constant subgraph behind a tensor: the initializers it reads and the nodes on the way."""

    initializers: frozenset[str]
    nodes: frozenset[int]
    scales: frozenset[str] = frozenset()  # initializers read at a DequantizeLinear's scale / zero point


@dataclass(frozen=True)
class Linear:
    node: int  # the MatMul/Gemm, or the custom node reading the weight
    weights: tuple[str, ...]  # one, or the expert weights of a MoE node
    flops: float  # per token: 2 * in * out, experts weighted by top_k / n_experts
    weight_dtype: str
    fp8_weight: bool
    fp8_activation: bool
    scheme: str  # "fp8, block 128", "fp8, per-tensor", ... ; "" for a high-precision weight
    trace_nodes: frozenset[int]  # nodes of the weights' constant subgraphs
    kind: str = "matmul"  # "matmul" | "custom" (a weight a custom node reads) | "experts"
    weight_shape: tuple[int, ...] = ()
    scale_shape: tuple[int, ...] | None = None  # the stored scales (first expert weight's, for experts)
    activation: str = ""  # how the activation is quantized: "fp8, 1x128 tiles (online)", ... ; "" if not

    @property
    def runs_fp8(self) -> bool:
        return self.fp8_weight and self.fp8_activation


def short_name(weight: str) -> str:
    """`model.layers.3.self_attn.q_a_proj.weight` -> `self_attn.q_a_proj`; `mtp.0.block.mlp.x.weight` -> `mlp.x`."""
    name = weight
    for prefix in ("model.layers.", "layers."):
        if name.startswith(prefix):
            name = name[len(prefix) :].split(".", 1)[-1]
    if name.startswith("mtp."):
        parts = name.split(".")
        name = ".".join(parts[3:] if len(parts) > 3 and parts[2] == "block" else parts[2:]) or name
    for suffix in (".weight", "_fp8", ".weight_fp8"):
        name = name.removesuffix(suffix)
    return name


def fp8_label(elem_type: int) -> str:
    return "fp8" if elem_type == TensorProto.FLOAT8E4M3FN else dtype_name(elem_type)


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


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
            if node.op_type in WEIGHT_PATH and node.domain in ("", "ai.onnx"):
                parts = [self.trace(name, depth + 1) for name in node.input if name]
                if all(p is not None for p in parts):
                    inits = frozenset().union(*(p.initializers for p in parts if p))
                    nodes = frozenset({i}).union(*(p.nodes for p in parts if p))
                    scales = frozenset().union(*(p.scales for p in parts if p))
                    if node.op_type == "DequantizeLinear":
                        scales |= frozenset().union(*(p.initializers for p in parts[1:] if p))
                    elif node.op_type in ("Mul", "Div") and any(self._has_fp8(p) for p in parts if p):
                        # DequantizeLinear(w, 1) * block scales: the operand without the fp8 weight is a scale
                        scales |= frozenset().union(*(p.initializers for p in parts if p and not self._has_fp8(p)))
                    result = Trace(inits, nodes, scales)
        self._memo[tensor] = result
        return result

    def _has_fp8(self, trace: Trace) -> bool:
        return any(self.index.initializers[n].data_type in FP8_TYPES for n in trace.initializers - trace.scales)

    def weights(self, trace: Trace) -> list[onnx.TensorProto]:
        """The weight initializers of a constant subgraph: its fp8 ones, else its largest float ones (rank >= 2)."""
        inits = [self.index.initializers[n] for n in sorted(trace.initializers - trace.scales)]
        fp8 = [t for t in inits if t.data_type in FP8_TYPES]
        if fp8:
            return fp8
        floats = [t for t in inits if t.data_type in _FLOATS and len(t.dims) >= 2]
        top = max((math.prod(t.dims) for t in floats), default=0)
        return [t for t in floats if math.prod(t.dims) * 8 >= top]

    def _scales(self, weight: onnx.TensorProto, trace: Trace) -> list[onnx.TensorProto]:
        index = self.index
        found = [index.initializers[n] for n in sorted(trace.scales)]
        found = [t for t in found if t.data_type in _FLOATS and t is not weight]
        if len(found) > 1:  # a DequantizeLinear of scale 1 next to the real scales: the scalar says nothing
            found = [t for t in found if math.prod(t.dims) > 1] or found
        if not found:  # a scale read another way (a Mul after a DequantizeLinear of scale 1)
            found = [
                t
                for n in sorted(trace.initializers)
                if (t := index.initializers[n]) is not weight
                and t.data_type in _FLOATS
                and math.prod(t.dims) < math.prod(weight.dims)
            ]
        return found

    def _scheme(self, weight: onnx.TensorProto, trace: Trace) -> tuple[str, tuple[int, ...] | None]:
        """("fp8, block 128", scale dims) for an fp8 weight; ("", None) for a high-precision one."""
        if weight.data_type not in FP8_TYPES:
            return "", None
        label = fp8_label(weight.data_type)
        scales = self._scales(weight, trace)
        # the scale that a DequantizeLinear of this weight reads (through its expansion), if any
        own = [t for t in scales if self._feeds_dequantize_of(t.name, weight.name, trace)] or scales
        scale = max(own, key=lambda t: math.prod(t.dims), default=None)
        dims = tuple(scale.dims) if scale is not None else None
        for i in sorted(trace.nodes):
            node = self.index.nodes[i]
            if node.op_type == "DequantizeLinear" and node.input[0] == weight.name and _attr(node, "block_size"):
                return f"{label}, block {_attr(node, 'block_size')}", dims
        if scale is None:
            return f"{label}, no scale", None
        return f"{label}, {_granularity(tuple(weight.dims), tuple(scale.dims))}", dims

    def scale_of(self, weight: str) -> tuple[int, ...] | None:
        """The dims of the stored scales that a DequantizeLinear of the initializer `weight` reads, if any."""
        index = self.index
        for j, k in index.consumers.get(weight, []):
            node = index.nodes[j]
            if k == 0 and node.op_type == "DequantizeLinear" and len(node.input) > 1:
                trace = self.trace(node.input[1])
                scales = [index.initializers[n] for n in sorted(trace.initializers)] if trace else []
                scales = [t for t in scales if t.data_type in _FLOATS]
                if scales:
                    return tuple(max(scales, key=lambda t: math.prod(t.dims)).dims)
        return None

    def _feeds_dequantize_of(self, scale: str, weight: str, trace: Trace) -> bool:
        for i in trace.nodes:
            node = self.index.nodes[i]
            if node.op_type == "DequantizeLinear" and node.input[0] == weight and len(node.input) > 1:
                t = self.trace(node.input[1])
                if t is not None and scale in t.initializers:
                    return True
        return False

    def activation(self, tensor: str) -> str:
        """How the data input `tensor` of a linear is quantized: "fp8, 1x128 tiles (online)", ...; "" if not."""
        index, seen, todo = self.index, set(), [(tensor, 0)]
        while todo:
            name, depth = todo.pop()
            if name in seen or name not in index.producer or depth > 10:
                continue
            seen.add(name)
            node = index.nodes[index.producer[name][0]]
            if node.op_type == "Cast" and _attr(node, "to") in FP8_TYPES:
                return f"{fp8_label(_attr(node, 'to'))}, cast"
            if node.op_type == "QuantizeLinear" and (to := self._quantizes_to(node)):
                return self._activation_label(node, to)
            if node.op_type in _ACT_PATH:
                todo += [(n, depth + 1) for n in node.input[:2] if n and n not in index.initializers]
        return ""

    def _activation_label(self, node: onnx.NodeProto, to: int) -> str:
        label = fp8_label(to)
        scale = node.input[1] if len(node.input) > 1 else ""
        static = self.trace(scale) is not None if scale else False
        block = _attr(node, "block_size")
        if block:
            return f"{label}, 1x{block} tiles ({'static' if static else 'online'})"
        return f"{label}, per-tensor ({'static' if static else 'online'})"

    def _quantizes_to(self, node: onnx.NodeProto) -> int:
        to = _attr(node, "output_dtype")
        if to in FP8_TYPES:
            return to
        types = self.index.elem_types
        zero_point = node.input[2] if len(node.input) > 2 else ""
        for t in (types.get(zero_point), types.get(node.output[0])):
            if t in FP8_TYPES:
                return t
        return 0

    def find(self) -> list[Linear]:
        """Every linear, one per weight (a weight that several MatMuls read, as an inlined attention core's
        kv_b_proj split in two, is one linear with their FLOPs summed)."""
        merged: dict[tuple[str, ...], Linear] = {}
        for linear in self._find():
            old = merged.get(linear.weights)
            if old is None:
                merged[linear.weights] = linear
            else:
                both = old.fp8_activation and linear.fp8_activation
                merged[linear.weights] = dataclasses.replace(
                    old,
                    flops=old.flops + linear.flops,
                    fp8_activation=both,
                    activation=old.activation if both else "",
                    trace_nodes=old.trace_nodes | linear.trace_nodes,
                )
        return list(merged.values())

    def _find(self) -> list[Linear]:
        found: list[Linear] = []
        for i, node in enumerate(self.index.nodes):
            if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and len(node.input) > 1:
                linear = self._matmul(i, node)
                if linear is not None:
                    found.append(linear)
            elif is_custom(node) and (node.domain == DOMAIN or node.op_type in MOE_OPS):
                found += self._custom(i, node)
        return found

    def _linear(
        self, i: int, trace: Trace, weight: onnx.TensorProto, flops: float, kind: str, activation: str
    ) -> Linear:
        scheme, scale = self._scheme(weight, trace)
        fp8 = weight.data_type in FP8_TYPES
        return Linear(
            i,
            (weight.name,),
            flops,
            _dtype(weight.data_type),
            fp8,
            bool(activation),
            scheme,
            trace.nodes,
            kind,
            tuple(weight.dims),
            scale,
            activation,
        )

    def _matmul(self, i: int, node: onnx.NodeProto) -> Linear | None:
        trace = self.trace(node.input[1])
        weights = self.weights(trace) if trace else []
        if not weights or trace is None:
            return None
        weight = weights[0]
        # the operand's shape when known (a slice of the weight, per-head blocks), else the weights' own
        operand = [d for d in self.index.shapes.get(node.input[1], ()) if isinstance(d, int)]
        static = bool(operand) and len(operand) == len(self.index.shapes[node.input[1]])
        flops = 2.0 * (math.prod(operand) if static else sum(math.prod(w.dims) for w in weights))
        return self._linear(i, trace, weight, flops, "matmul", self.activation(node.input[0]))

    def _custom(self, i: int, node: onnx.NodeProto) -> list[Linear]:
        """The weights a custom node reads: rank-2 ones each a linear, rank-3 (MoE experts) one linear."""
        top_k = _attr(node, "top_k", 0) or _attr(node, "k", 1)
        found, experts = [], []
        for name in node.input[1:]:
            trace = self.trace(name) if name else None
            weights = self.weights(trace) if trace else []
            if trace is None or not weights:
                continue
            rank = len(weights[0].dims)
            if rank == 2 and len(weights) == 1:
                found.append(self._linear(i, trace, weights[0], 2.0 * math.prod(weights[0].dims), "custom", ""))
            elif rank == 3 and node.op_type in MOE_OPS:
                experts += [(w, trace) for w in weights]
        if experts:
            w0, t0 = experts[0]
            flops = sum(2.0 * math.prod(w.dims) * top_k / max(w.dims[0], 1) for w, _ in experts)
            scheme, scale = self._scheme(w0, t0)
            fp8 = all(w.data_type in FP8_TYPES for w, _ in experts)
            found.append(
                Linear(
                    i,
                    tuple(w.name for w, _ in experts),
                    flops,
                    _dtype(w0.data_type),
                    fp8,
                    False,
                    scheme if fp8 else "",
                    frozenset().union(*(t.nodes for _, t in experts)),
                    "experts",
                    tuple(w0.dims),
                    scale if fp8 else None,
                    "",
                )
            )
        return found


def _dtype(elem_type: int) -> str:
    return dtype_name(elem_type)


def _block(w: int, s: int) -> int:
    """The block size that maps `w` elements onto `s` scales: the smallest power of two if one fits (DeepSeek's
    128 blocks on a dimension smaller than 128), else ceil(w / s)."""
    if s >= w:
        return 1
    b = 1
    while math.ceil(w / b) > s:
        b *= 2
    return b if math.ceil(w / b) == s else math.ceil(w / s)


def _granularity(weight: tuple[int, ...], scale: tuple[int, ...]) -> str:
    """Name the scale layout: per-tensor, per-channel, per-expert, or the blocks that map `weight` onto `scale`."""
    while len(scale) > len(weight) and scale[-1] == 1:  # [out, in / b, 1]: scales broadcast over a block
        scale = scale[:-1]
    dims = [d for d in scale if d != 1]
    if not dims:
        return "per-tensor"
    if len(weight) == 3 and tuple(scale) == weight[:1]:
        return "per-expert"
    if len(scale) == 1 and dims[0] in weight:
        return "per-channel"
    if len(scale) != len(weight):
        return f"scale {list(scale)}"
    pairs = list(zip(weight, scale, strict=True))
    if len(weight) == 3 and pairs[0][0] == pairs[0][1]:
        pairs = pairs[1:]  # one block per expert
    # one scale over a whole dimension fits any block at least that long: take the other dimensions' block
    sized = [_block(w, s) for w, s in pairs if s > 1 or w == 1]
    blocks = [_block(w, s) if s > 1 or w == 1 or not sized else max(max(sized), w) for w, s in pairs]
    if len(set(blocks)) == 1:
        return f"block {blocks[0]}"
    return "block " + "x".join(map(str, blocks))


def find_linears(index: GraphIndex) -> list[Linear]:
    return LinearFinder(index).find()
