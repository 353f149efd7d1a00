"""A cached view over one `ir.Graph`: node order, tensor names, layer numbers.

Producers and consumers come from onnx_ir (`value.producer()`, `value.uses()`); the view only numbers the
nodes in graph order (the matching and the diff refer to nodes by that number) and maps tensor names to
values, so that callers (linear detection, matching, diff) stay linear in the graph's size.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Hashable, Iterator, Mapping
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


class _Producers(Mapping[str, tuple[int, int]]):
    """Tensor name -> (node number, output index), read from `value.producer()`."""

    def __init__(self, view: GraphIndex) -> None:
        self._view = view

    def __getitem__(self, name: str) -> tuple[int, int]:
        value = self._view.values.get(name)
        node = value.producer() if value is not None else None
        i = self._view.position.get(node) if node is not None else None
        if value is None or i is None:
            raise KeyError(name)
        return i, value.index() or 0

    def __contains__(self, name: object) -> bool:
        value = self._view.values.get(name) if isinstance(name, str) else None
        node = value.producer() if value is not None else None
        return node is not None and node in self._view.position

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._view.values if name in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _Consumers(Mapping[str, list[tuple[int, int]]]):
    """Tensor name -> [(node number, input index)] in graph order, read from `value.uses()`."""

    def __init__(self, view: GraphIndex) -> None:
        self._view = view

    def __getitem__(self, name: str) -> list[tuple[int, int]]:
        value = self._view.values.get(name)
        if value is None:
            raise KeyError(name)
        position = self._view.position
        # uses by nodes of subgraphs are left out: the view is the top level
        found = sorted((position[u.node], u.idx) for u in value.uses() if u.node in position)
        if not found:
            raise KeyError(name)
        return found

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._view.values if name in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class GraphIndex:
    """Node numbers and tensor names of a graph (top level only; subgraphs are attributes)."""

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
        self.producer = _Producers(self)
        self.consumers = _Consumers(self)

    def __len__(self) -> int:
        return len(self.nodes)

    def elem_type(self, name: str) -> int | None:
        """The tensor's element type where the graph declares it (value_info, an initializer), else None."""
        value = self.values.get(name)
        dtype = value.dtype if value is not None else None
        return int(dtype) if dtype is not None and dtype != ir.DataType.UNDEFINED else None

    def shape(self, name: str) -> tuple[int | str, ...]:
        """The tensor's declared dims (an int, a symbol, or "?"); () when the graph declares no shape."""
        value = self.values.get(name)
        if value is None or value.shape is None:
            return ()
        return tuple(d if isinstance(d, int) else d.value or "?" for d in value.shape.dims)

    def op(self, i: int) -> str:
        return op_label(self.nodes[i])

    def label(self, i: int) -> str:
        """A node's name, or `op(first output)` when it has none."""
        node = self.nodes[i]
        return node.name or f"{op_label(node)}({node.outputs[0].name or '' if node.outputs else '?'})"

    @functools.cached_property
    def layers(self) -> list[int | None]:
        return [self._layer(node) for node in self.nodes]

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
