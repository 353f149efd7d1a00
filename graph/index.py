"""A cached view over one `ir.Graph`: node order, layer numbers, and the names looked up across two graphs.

Callers (matching, rewrite grouping, diff) work on `ir.Node` and `ir.Value` objects, walking producers and
readers through onnx_ir (`value.producer()`, `value.uses()`); the view keeps each node's place (to report
in graph order) and layer, and maps tensor names to values only for what two graphs share by name.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
from dsv3c.onnxkit.dtypes import dtype_name

# domains of standard ONNX; any other domain (dsv3c, com.microsoft, ...) is a custom node
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})

# `model.layers.3.`, `/model/layers.3/`, `model_layers_3_` (torch.onnx value names), `layer.3.`
_LAYER = re.compile(r"(?:^|[./_:])layers?[._/](\d+)(?=[./_:]|$)")


def layer_of_name(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def op_label(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def is_custom(node: ir.Node) -> bool:
    return node.domain not in STANDARD_DOMAINS


def input_names(node: ir.Node) -> list[str]:
    """The names a node reads, "" for an omitted optional input (as ONNX writes them)."""
    return [v.name or "" if v is not None else "" for v in node.inputs]


def output_names(node: ir.Node) -> list[str]:
    return [v.name or "" for v in node.outputs]


def int_attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None and attr.type == ir.AttributeType.INT else default


class GraphIndex:
    """The top level of a graph (subgraphs are attributes) in graph order: each node's place and layer.

    Producers and readers are onnx_ir's (`value.producer()`, `value.uses()`), restricted to this level; the
    place only orders nodes (reports list them in graph order). Tensor names are kept for what is looked up
    across two graphs by name (a node's outputs in the other graph, initializers, graph inputs) and printed.
    """

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.nodes: list[ir.Node] = list(graph)
        self.position: dict[ir.Node, int] = {node: i for i, node in enumerate(self.nodes)}
        self.initializers: Mapping[str, ir.Value] = graph.initializers
        self.values: dict[str, ir.Value] = {}
        for v in (*graph.inputs, *graph.initializers.values()):
            if v.name:
                self.values[v.name] = v
        for node in self.nodes:
            for v in node.outputs:
                if v.name:
                    self.values[v.name] = v
        self.inputs = [v.name or "" for v in graph.inputs if v.name not in self.initializers]
        self.outputs = [v.name or "" for v in graph.outputs]
        self.output_values = frozenset(graph.outputs)

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, node: object) -> bool:
        return node in self.position

    def producer(self, value: ir.Value | None) -> ir.Node | None:
        """The node of this level computing `value`; None for an input, an initializer, or an omitted input."""
        node = value.producer() if value is not None else None
        return node if node is not None and node in self.position else None

    def made(self, name: str) -> ir.Node | None:
        """The node computing the tensor named `name` here (a name looked up from the other graph)."""
        return self.producer(self.values.get(name)) if name else None

    def uses(self, value: ir.Value | None) -> list[tuple[ir.Node, int]]:
        """(node, input index) of this level's readers of `value`, in graph order (subgraphs' uses left out)."""
        if value is None:
            return []
        position = self.position
        found = [(u.node, u.idx) for u in value.uses() if u.node in position]
        return sorted(found, key=lambda use: (position[use[0]], use[1]))

    def readers(self, node: ir.Node) -> list[ir.Node]:
        """The nodes reading any output of `node`, each once, in graph order."""
        return self.in_order({c for v in node.outputs for c, _ in self.uses(v)})

    def is_initializer(self, value: ir.Value | None) -> bool:
        return value is not None and value.name is not None and self.initializers.get(value.name) is value

    def is_output(self, node: ir.Node) -> bool:
        return any(v in self.output_values for v in node.outputs)

    def in_order(self, nodes: Iterable[ir.Node]) -> list[ir.Node]:
        return sorted(nodes, key=self.position.__getitem__)

    def label(self, node: ir.Node) -> str:
        """A node's name, or `op(first output)` when it has none."""
        return node.name or f"{op_label(node)}({node.outputs[0].name or '' if node.outputs else '?'})"

    def layer(self, node: ir.Node) -> int | None:
        return self._layers[node]

    @functools.cached_property
    def _layers(self) -> dict[ir.Node, int | None]:
        return {node: self._layer(node) for node in self.nodes}

    def _layer(self, node: ir.Node) -> int | None:
        inputs = input_names(node)
        weights = [n for n in inputs if n in self.initializers]
        meta = list(node.metadata_props.values())
        name = node.name or ""
        # a scoped name without a layer (`/model/norm/Div`) is outside the layers; others may read one's output
        read = [] if "/" in name else inputs
        for text in (name, *output_names(node), *meta, *weights, *read):
            layer = layer_of_name(text)
            if layer is not None:
                return layer
        return None


def elem_type(value: ir.Value) -> int | None:
    """The tensor's element type where the graph declares it (value_info, an initializer), else None."""
    dtype = value.dtype
    return int(dtype) if dtype is not None and dtype != ir.DataType.UNDEFINED else None


def _float(f: float) -> str:
    return f"{f:.8g}"


def attribute_text(a: ir.Attr) -> str:
    """An attribute's value as short text; tensors and graphs as dtype/shape plus a digest of their bytes."""
    kind, value = a.type, a.value
    A = ir.AttributeType
    if kind == A.INT:
        return str(value)
    if kind == A.FLOAT:
        return _float(value)
    if kind == A.STRING:
        return str(value)
    if kind == A.INTS:
        return str(list(value))
    if kind == A.FLOATS:
        return "[" + ", ".join(_float(f) for f in value) + "]"
    if kind == A.STRINGS:
        return str(list(value))
    if kind == A.TENSOR:
        return f"tensor {dtype_name(int(value.dtype))}{list(value.shape.numpy())} #{_tensor_digest(value)}"
    if kind == A.GRAPH:
        return f"graph ({len(value)} nodes) #{_digest(_proto_bytes(ir.serde.serialize_graph(value)))}"
    return f"{kind.name.lower()} #{_digest(_proto_bytes(ir.serde.serialize_attribute(a)))}"


def _proto_bytes(proto: Any) -> bytes:
    return proto.SerializeToString(deterministic=True)


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:10]


def _tensor_proto_bytes(tensor: ir.TensorProtocol, name: str | None = None) -> bytes:
    """The tensor's proto as stored (a tensor onnx_ir keeps as its proto), else as onnx_ir serializes it."""
    proto = tensor.raw if isinstance(tensor, ir.serde.TensorProtoTensor) else ir.serde.serialize_tensor(tensor)
    if name is not None and proto.name != name:
        copy = type(proto)()
        copy.CopyFrom(proto)
        copy.name = name
        proto = copy
    return proto.SerializeToString(deterministic=True)


def _tensor_digest(tensor: ir.TensorProtocol) -> str:
    return _digest(_tensor_proto_bytes(tensor))


def attribute_key(a: ir.Attr) -> Hashable:
    """What an attribute holds, exactly (floats by repr, tensors by their bytes): equal keys, equal attributes."""
    kind, value = a.type, a.value
    A = ir.AttributeType
    if kind in (A.INT, A.STRING):
        return (a.name, kind.value, value)
    if kind == A.FLOAT:
        return (a.name, kind.value, repr(value))
    if kind in (A.INTS, A.STRINGS):
        return (a.name, kind.value, tuple(value))
    if kind == A.FLOATS:
        return (a.name, kind.value, tuple(repr(f) for f in value))
    if kind == A.TENSOR:
        return (a.name, kind.value, hashlib.sha1(_tensor_proto_bytes(value)).hexdigest())
    return (a.name, kind.value, attribute_text(a))


def constant_key(node: ir.Node) -> Hashable | None:
    """A Constant node's value as a hashable key (dtype, shape, bytes), whatever attribute holds it; else None."""
    if node.op_type != "Constant" or node.inputs or node.domain not in ("", "ai.onnx") or len(node.attributes) != 1:
        return None
    a = next(iter(node.attributes.values()))
    if a.name == "value" and a.type == ir.AttributeType.TENSOR:
        tensor = a.value
        if isinstance(tensor, ir.ExternalTensor):
            return ("c", _digest(_tensor_proto_bytes(tensor, "")))
        try:
            array = np.asarray(tensor.numpy())
        except Exception:  # an odd tensor: its proto then
            return ("c", _digest(_tensor_proto_bytes(tensor, "")))
    elif a.name in ("value_int", "value_ints"):
        array = np.asarray(a.value if a.name == "value_int" else list(a.value), np.int64)
    elif a.name in ("value_float", "value_floats"):
        array = np.asarray(a.value if a.name == "value_float" else list(a.value), np.float32)
    else:
        return ("c", _digest(ir.serde.serialize_attribute(a).SerializeToString(deterministic=True)))
    return ("c", array.dtype.str, array.shape, hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest())
