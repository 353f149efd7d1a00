"""The one linear finder: where a weight enters a linear layer, and how it and its activation are quantized.

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

`LinearFinder.find` describes every linear (for inspect and diff); `rewritable_linears` is the same walk
restricted to the forms the passes rewrite (the exporter's `MatMul(x, Transpose(W))` and the custom nodes'
weight inputs), one entry per weight use.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterator
from dataclasses import dataclass

import onnx_ir as ir
from dsv3c.artifact.names import DOMAIN, MLA_OP, MOE_OP
from dsv3c.onnxkit.dtypes import dtype_name

DT = ir.DataType
FP8_TYPES = frozenset({DT.FLOAT8E4M3FN, DT.FLOAT8E4M3FNUZ, DT.FLOAT8E5M2, DT.FLOAT8E5M2FNUZ})
_FLOATS = FP8_TYPES | {DT.FLOAT, DT.FLOAT16, DT.BFLOAT16, DT.DOUBLE}


def _ops(names: str) -> frozenset[str]:
    return frozenset(names.split())


# ops that may sit between a weight initializer and the linear (constant subgraph of the weight)
WEIGHT_PATH = _ops(
    "Transpose Cast CastLike DequantizeLinear Reshape Mul Div Identity Squeeze Unsqueeze Flatten Expand Tile "
    "Concat Constant Slice Split"
)
# ops that may sit between an activation's online quantization and the linear
_ACT_PATH = _ops(
    "DequantizeLinear QuantizeLinear Reshape Cast Mul Div Transpose Identity Squeeze Unsqueeze Flatten Slice Pad"
)
MOE_OPS = frozenset({"MoE", "QMoE"})
_MAX_DEPTH = 12

MLA_WEIGHT_INPUT = 4
MOE_ROUTER_INPUT = 1
MOE_EXPERT_INPUTS = (3, 4, 5)  # gate [E, ff, D], up [E, ff, D], down [E, D, ff]


def _standard(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _attr(node: ir.Node, name: str, default: int = 0) -> int:
    a = node.attributes.get(name)
    return a.as_int() if a is not None and a.type == ir.AttributeType.INT else default


def dtype_of(value: ir.Value) -> ir.DataType | None:
    """An initializer's element type (its tensor's), else the declared type of the value."""
    tensor = value.const_value
    return tensor.dtype if tensor is not None else value.dtype


def dims_of(value: ir.Value) -> tuple[int, ...]:
    tensor = value.const_value
    if tensor is not None:
        return tuple(int(d) for d in tensor.shape.numpy())
    shape = value.shape
    return tuple(d if isinstance(d, int) else 0 for d in shape.dims) if shape is not None else ()


def _numel(value: ir.Value) -> int:
    return math.prod(dims_of(value))


def _name(value: ir.Value) -> str:
    return value.name or ""


def fp8_label(dtype: ir.DataType | int) -> str:
    return "fp8" if dtype == DT.FLOAT8E4M3FN else dtype_name(dtype)


@dataclass(frozen=True)
class Trace:
    """The constant subgraph behind a value: the initializers it reads and the nodes on the way."""

    initializers: frozenset[ir.Value]
    nodes: frozenset[ir.Node]
    scales: frozenset[ir.Value] = frozenset()  # initializers read at a DequantizeLinear's scale / zero point


@dataclass(frozen=True)
class Linear:
    node: ir.Node  # the MatMul/Gemm, or the custom node reading the weight
    weights: tuple[ir.Value, ...]  # one, or the expert weights of a MoE node
    flops: float  # per token: 2 * in * out, experts weighted by top_k / n_experts
    weight_dtype: str
    fp8_weight: bool
    fp8_activation: bool
    scheme: str  # "fp8, block 128", "fp8, per-tensor", ... ; "" for a high-precision weight
    trace_nodes: frozenset[ir.Node]  # nodes of the weights' constant subgraphs
    kind: str = "matmul"  # "matmul" | "custom" (a weight a custom node reads) | "experts"
    weight_shape: tuple[int, ...] = ()
    scale_shape: tuple[int, ...] | None = None  # the stored scales (first expert weight's, for experts)
    activation: str = ""  # how the activation is quantized: "fp8, 1x128 tiles (online)", ... ; "" if not

    @property
    def runs_fp8(self) -> bool:
        return self.fp8_weight and self.fp8_activation

    @property
    def weight_names(self) -> tuple[str, ...]:
        return tuple(_name(w) for w in self.weights)


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


def weight_sites(graph: ir.Graph) -> Iterator[tuple[ir.Node, int]]:
    """(node, input index) of every place a weight may enter a linear, in graph order: a MatMul/Gemm's
    input 1, a dsv3c custom node's or a MoE kernel's inputs after the first (the activation)."""
    for node in graph:
        if node.op_type in ("MatMul", "Gemm") and _standard(node) and len(node.inputs) > 1:
            yield node, 1
        elif node.domain not in ("", "ai.onnx", "ai.onnx.ml") and (node.domain == DOMAIN or node.op_type in MOE_OPS):
            yield from ((node, k) for k in range(1, len(node.inputs)))


class LinearFinder:
    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.order = {node: i for i, node in enumerate(graph)}
        self._memo: dict[ir.Value, Trace | None] = {}

    def _sorted_nodes(self, nodes: frozenset[ir.Node]) -> list[ir.Node]:
        return sorted(nodes, key=lambda n: self.order.get(n, -1))

    def trace(self, value: ir.Value | None, depth: int = 0) -> Trace | None:
        """The constant subgraph producing `value`, or None when it depends on a graph input."""
        if value is None:
            return None
        if value in self._memo:
            return self._memo[value]
        result = None
        node = value.producer()
        if value.is_initializer():
            result = Trace(frozenset({value}), frozenset())
        elif (
            node is not None
            and node in self.order
            and depth < _MAX_DEPTH
            and node.op_type in WEIGHT_PATH
            and _standard(node)
        ):
            parts = [self.trace(v, depth + 1) for v in node.inputs if v is not None and v.name]
            if all(p is not None for p in parts):
                inits = frozenset().union(*(p.initializers for p in parts if p))
                nodes = frozenset({node}).union(*(p.nodes for p in parts if p))
                scales = frozenset().union(*(p.scales for p in parts if p))
                if node.op_type == "DequantizeLinear":
                    scales |= frozenset().union(*(p.initializers for p in parts[1:] if p))
                elif node.op_type in ("Mul", "Div") and any(self._has_fp8(p) for p in parts if p):
                    # DequantizeLinear(w, 1) * block scales: the operand without the fp8 weight is a scale
                    scales |= frozenset().union(*(p.initializers for p in parts if p and not self._has_fp8(p)))
                result = Trace(inits, nodes, scales)
        self._memo[value] = result
        return result

    def _has_fp8(self, trace: Trace) -> bool:
        return any(dtype_of(v) in FP8_TYPES for v in trace.initializers - trace.scales)

    def weights(self, trace: Trace) -> list[ir.Value]:
        """The weight initializers of a constant subgraph: its fp8 ones, else its largest float ones (rank >= 2)."""
        inits = sorted(trace.initializers - trace.scales, key=_name)
        fp8 = [v for v in inits if dtype_of(v) in FP8_TYPES]
        if fp8:
            return fp8
        floats = [v for v in inits if dtype_of(v) in _FLOATS and len(dims_of(v)) >= 2]
        top = max((_numel(v) for v in floats), default=0)
        return [v for v in floats if _numel(v) * 8 >= top]

    def _scales(self, weight: ir.Value, trace: Trace) -> list[ir.Value]:
        found = [v for v in sorted(trace.scales, key=_name) if dtype_of(v) in _FLOATS and v is not weight]
        if len(found) > 1:  # a DequantizeLinear of scale 1 next to the real scales: the scalar says nothing
            found = [v for v in found if _numel(v) > 1] or found
        if not found:  # a scale read another way (a Mul after a DequantizeLinear of scale 1)
            found = [
                v
                for v in sorted(trace.initializers, key=_name)
                if v is not weight and dtype_of(v) in _FLOATS and _numel(v) < _numel(weight)
            ]
        return found

    def _scheme(self, weight: ir.Value, trace: Trace) -> tuple[str, tuple[int, ...] | None]:
        """("fp8, block 128", scale dims) for an fp8 weight; ("", None) for a high-precision one."""
        dtype = dtype_of(weight)
        if dtype not in FP8_TYPES:
            return "", None
        label = fp8_label(dtype)
        scales = self._scales(weight, trace)
        # the scale that a DequantizeLinear of this weight reads (through its expansion), if any
        own = [v for v in scales if self._feeds_dequantize_of(v, weight, trace)] or scales
        scale = max(own, key=_numel, default=None)
        dims = dims_of(scale) if scale is not None else None
        for node in self._sorted_nodes(trace.nodes):
            if node.op_type == "DequantizeLinear" and node.inputs[0] is weight and _attr(node, "block_size"):
                return f"{label}, block {_attr(node, 'block_size')}", dims
        if scale is None:
            return f"{label}, no scale", None
        return f"{label}, {_granularity(dims_of(weight), dims_of(scale))}", dims

    def scale_of(self, weight: ir.Value) -> tuple[int, ...] | None:
        """The dims of the stored scales that a DequantizeLinear of the initializer `weight` reads, if any."""
        for use in sorted(weight.uses(), key=lambda u: (self.order.get(u.node, -1), u.idx)):
            node = use.node
            if node not in self.order:
                continue
            if use.idx == 0 and node.op_type == "DequantizeLinear" and len(node.inputs) > 1:
                trace = self.trace(node.inputs[1]) if node.inputs[1] is not None and node.inputs[1].name else None
                scales = sorted(trace.initializers, key=_name) if trace else []
                scales = [v for v in scales if dtype_of(v) in _FLOATS]
                if scales:
                    return dims_of(max(scales, key=_numel))
        return None

    def _feeds_dequantize_of(self, scale: ir.Value, weight: ir.Value, trace: Trace) -> bool:
        for node in trace.nodes:
            if node.op_type == "DequantizeLinear" and node.inputs[0] is weight and len(node.inputs) > 1:
                t = self.trace(node.inputs[1])
                if t is not None and scale in t.initializers:
                    return True
        return False

    def activation(self, value: ir.Value | None) -> str:
        """How the data input `value` of a linear is quantized: "fp8, 1x128 tiles (online)", ...; "" if not."""
        seen: set[ir.Value] = set()
        todo = [(value, 0)] if value is not None else []
        while todo:
            v, depth = todo.pop()
            node = v.producer()
            if v in seen or node is None or node not in self.order or depth > 10:
                continue
            seen.add(v)
            if node.op_type == "Cast" and _attr(node, "to") in FP8_TYPES:
                return f"{fp8_label(_attr(node, 'to'))}, cast"
            if node.op_type == "QuantizeLinear" and (to := self._quantizes_to(node)):
                return self._activation_label(node, to)
            if node.op_type in _ACT_PATH:
                todo += [(x, depth + 1) for x in node.inputs[:2] if x is not None and x.name and not x.is_initializer()]
        return ""

    def _activation_label(self, node: ir.Node, to: int) -> str:
        label = fp8_label(to)
        scale = node.inputs[1] if len(node.inputs) > 1 else None
        static = self.trace(scale) is not None if scale is not None and scale.name else False
        block = _attr(node, "block_size")
        if block:
            return f"{label}, 1x{block} tiles ({'static' if static else 'online'})"
        return f"{label}, per-tensor ({'static' if static else 'online'})"

    def _quantizes_to(self, node: ir.Node) -> int:
        to = _attr(node, "output_dtype")
        if to in FP8_TYPES:
            return to
        zero_point = node.inputs[2] if len(node.inputs) > 2 else None
        for v in (zero_point, node.outputs[0]):
            dtype = v.dtype if v is not None and v.name else None
            if dtype in FP8_TYPES:
                return int(dtype)
        return 0

    def find(self) -> list[Linear]:
        """Every linear, one per weight (a weight that several MatMuls read, as an inlined attention core's
        kv_b_proj split in two, is one linear with their FLOPs summed)."""
        merged: dict[tuple[ir.Value, ...], Linear] = {}
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
        done: set[ir.Node] = set()
        for node, _ in weight_sites(self.graph):
            if node.op_type in ("MatMul", "Gemm") and _standard(node):
                linear = self._matmul(node)
                if linear is not None:
                    found.append(linear)
            elif node not in done:  # a custom node: all its weight inputs at once
                done.add(node)
                found += self._custom(node)
        return found

    def _linear(self, node: ir.Node, trace: Trace, weight: ir.Value, flops: float, kind: str, act: str) -> Linear:
        scheme, scale = self._scheme(weight, trace)
        dtype = dtype_of(weight)
        return Linear(
            node,
            (weight,),
            flops,
            dtype_name(dtype),
            dtype in FP8_TYPES,
            bool(act),
            scheme,
            trace.nodes,
            kind,
            dims_of(weight),
            scale,
            act,
        )

    def _matmul(self, node: ir.Node) -> Linear | None:
        operand = node.inputs[1]
        trace = self.trace(operand) if operand is not None and operand.name else None
        weights = self.weights(trace) if trace else []
        if not weights or trace is None or operand is None:
            return None
        weight = weights[0]
        # the operand's shape when known (a slice of the weight, per-head blocks), else the weights' own
        shape = operand.shape.dims if operand.shape is not None else ()
        known = [d for d in shape if isinstance(d, int)]
        static = bool(known) and len(known) == len(shape)
        flops = 2.0 * (math.prod(known) if static else sum(_numel(w) for w in weights))
        return self._linear(node, trace, weight, flops, "matmul", self.activation(node.inputs[0]))

    def _custom(self, node: ir.Node) -> list[Linear]:
        """The weights a custom node reads: rank-2 ones each a linear, rank-3 (MoE experts) one linear."""
        top_k = _attr(node, "top_k", 0) or _attr(node, "k", 1)
        found, experts = [], []
        for value in node.inputs[1:]:
            trace = self.trace(value) if value is not None and value.name else None
            weights = self.weights(trace) if trace else []
            if trace is None or not weights:
                continue
            rank = len(dims_of(weights[0]))
            if rank == 2 and len(weights) == 1:
                w = weights[0]
                found.append(self._linear(node, trace, w, 2.0 * _numel(w), "custom", ""))
            elif rank == 3 and node.op_type in MOE_OPS:
                experts += [(w, trace) for w in weights]
        if experts:
            w0, t0 = experts[0]
            flops = sum(2.0 * _numel(w) * top_k / max(dims_of(w)[0], 1) for w, _ in experts)
            scheme, scale = self._scheme(w0, t0)
            fp8 = all(dtype_of(w) in FP8_TYPES for w, _ in experts)
            found.append(
                Linear(
                    node,
                    tuple(w for w, _ in experts),
                    flops,
                    dtype_name(dtype_of(w0)),
                    fp8,
                    False,
                    scheme if fp8 else "",
                    frozenset().union(*(t.nodes for _, t in experts)),
                    "experts",
                    dims_of(w0),
                    scale if fp8 else None,
                    "",
                )
            )
        return found


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


def find_linears(graph: ir.Graph) -> list[Linear]:
    """Every linear of `graph`, described (one per weight)."""
    return LinearFinder(graph).find()


# ---- the forms the passes rewrite ---------------------------------------------------------------------


class LinearKind(enum.Enum):
    MATMUL = "matmul"  # MatMul(x, Transpose(W)): the activation x is in the graph
    MLA_KV_B = "mla-kv-b"  # the attention core applies it to the latent cache
    MOE_ROUTER = "moe-router"
    MOE_EXPERTS = "moe-experts"  # stacked [E, out, in]; the MoE node applies them


@dataclass(frozen=True)
class WeightUse:
    """One use of a weight by a linear, in the exporter's form, which a pass can rewrite in place."""

    weight: ir.Value  # the initializer
    kind: LinearKind
    user: ir.Node  # MatMul, MLAAttention or MoE
    input_index: int  # which input of `user` the (transposed, dequantized) weight feeds

    @property
    def name(self) -> str:
        assert self.weight.name is not None
        return self.weight.name

    @property
    def activation(self) -> ir.Value | None:
        return self.user.inputs[0] if self.kind == LinearKind.MATMUL else None


def weight_source(
    value: ir.Value | None, through: frozenset[str] = frozenset({"DequantizeLinear", "Cast"})
) -> ir.Value | None:
    """The initializer behind `value`, looking through a weight's DequantizeLinear / Cast; None if none."""
    for _ in range(3):
        if value is None:
            return None
        if value.is_initializer():
            return value
        producer = value.producer()
        if producer is None or producer.op_type not in through or not _standard(producer):
            return None
        value = producer.inputs[0]
    return None


def _transposed_weight(node: ir.Node) -> ir.Value | None:
    value = node.inputs[1] if len(node.inputs) > 1 else None
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Transpose":
        return None
    perm = producer.attributes.get("perm")
    if perm is not None and list(perm.as_ints()) != [1, 0]:
        return None
    weight = weight_source(producer.inputs[0])
    return weight if weight is not None and weight.shape is not None and len(weight.shape) == 2 else None


def _rewritable_kind(node: ir.Node, k: int) -> LinearKind | None:
    if node.op_type == "MatMul" and _standard(node):
        return LinearKind.MATMUL
    if node.domain == DOMAIN and node.op_type == MLA_OP and k == MLA_WEIGHT_INPUT:
        return LinearKind.MLA_KV_B
    if node.domain == DOMAIN and node.op_type == MOE_OP and k == MOE_ROUTER_INPUT:
        return LinearKind.MOE_ROUTER
    if node.domain == DOMAIN and node.op_type == MOE_OP and k in MOE_EXPERT_INPUTS:
        return LinearKind.MOE_EXPERTS
    return None


def rewritable_linears(graph: ir.Graph) -> list[WeightUse]:
    """Every weight use in the exporter's form, in graph order (a weight used twice appears twice)."""
    found = []
    for node, k in weight_sites(graph):
        kind = _rewritable_kind(node, k)
        if kind is None:
            continue
        weight = _transposed_weight(node) if kind == LinearKind.MATMUL else weight_source(node.inputs[k])
        if weight is not None:
            found.append(WeightUse(weight, kind, node, k))
    return found


def layer_of(name: str) -> str:
    """`model.layers.3.mlp.down_proj.weight` -> `layers.3`; `mtp.0.block...` -> `mtp.0`; else the first word."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 2:
        return f"layers.{parts[2]}"
    if parts[0] == "mtp" and len(parts) > 1:
        return f"mtp.{parts[1]}"
    return parts[0] if parts[0] != "model" or len(parts) < 2 else parts[1]
