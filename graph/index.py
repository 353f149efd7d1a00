"""Lookups over one graph: producers and consumers of each tensor, node labels, layer numbers.

Everything is built once in dicts so that callers (linear detection, matching, diff) stay linear in the
graph's size.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Hashable
from typing import Any

import numpy as np
import onnx
from dsv3c.graph.load import dtype_name
from onnx import numpy_helper

# domains of standard ONNX; any other domain (dsv3c, com.microsoft, ...) is a custom node
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})

# `model.layers.3.`, `/model/layers.3/`, `model_layers_3_` (torch.onnx value names), `layer.3.`
_LAYER = re.compile(r"(?:^|[./_:])layers?[._/](\d+)(?=[./_:]|$)")


def layer_of_name(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def op_label(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def is_custom(node: onnx.NodeProto) -> bool:
    return node.domain not in STANDARD_DOMAINS


class GraphIndex:
    """Who produces and who consumes each tensor of a graph (top level only; subgraphs are attributes)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = [v.name for v in graph.input if v.name not in self.initializers]
        self.outputs = [v.name for v in graph.output]
        self.producer: dict[str, tuple[int, int]] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = {}
        for i, node in enumerate(self.nodes):
            for k, name in enumerate(node.output):
                if name:
                    self.producer[name] = (i, k)
            for k, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((i, k))
        self.elem_types: dict[str, int] = {t.name: t.data_type for t in graph.initializer}
        self.shapes: dict[str, tuple[int | str, ...]] = {t.name: tuple(t.dims) for t in graph.initializer}
        for v in (*graph.input, *graph.output, *graph.value_info):
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                self.elem_types[v.name] = v.type.tensor_type.elem_type
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
                dims = v.type.tensor_type.shape.dim
                self.shapes[v.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims
                )

    def __len__(self) -> int:
        return len(self.nodes)

    def op(self, i: int) -> str:
        return op_label(self.nodes[i])

    def label(self, i: int) -> str:
        """A node's name, or `op(first output)` when it has none."""
        node = self.nodes[i]
        return node.name or f"{op_label(node)}({node.output[0] if node.output else '?'})"

    @functools.cached_property
    def layers(self) -> list[int | None]:
        return [self._layer(node) for node in self.nodes]

    def _layer(self, node: onnx.NodeProto) -> int | None:
        weights = [n for n in node.input if n in self.initializers]
        meta = [p.value for p in node.metadata_props]
        # a scoped name without a layer (`/model/norm/Div`) is outside the layers; others may read one's output
        inputs = [] if "/" in node.name else node.input
        for name in (node.name, *node.output, *meta, *weights, *inputs):
            layer = layer_of_name(name)
            if layer is not None:
                return layer
        return None


def attribute_text(a: onnx.AttributeProto) -> str:
    """An attribute's value as short text; tensors and graphs as dtype/shape plus a digest of their bytes."""
    kind = a.type
    A = onnx.AttributeProto
    if kind == A.INT:
        return str(a.i)
    if kind == A.FLOAT:
        return f"{a.f:.8g}"
    if kind == A.STRING:
        return a.s.decode("utf-8", "replace")
    if kind == A.INTS:
        return str(list(a.ints))
    if kind == A.FLOATS:
        return "[" + ", ".join(f"{f:.8g}" for f in a.floats) + "]"
    if kind == A.STRINGS:
        return str([s.decode("utf-8", "replace") for s in a.strings])
    if kind == A.TENSOR:
        dtype = dtype_name(a.t.data_type)
        return f"tensor {dtype}{list(a.t.dims)} #{_digest(a.t)}"
    if kind == A.GRAPH:
        return f"graph ({len(a.g.node)} nodes) #{_digest(a.g)}"
    return f"{onnx.AttributeProto.AttributeType.Name(kind).lower()} #{_digest(a)}"


def _digest(proto: Any) -> str:
    return hashlib.sha1(proto.SerializeToString(deterministic=True)).hexdigest()[:10]


def constant_key(node: onnx.NodeProto) -> Hashable | None:
    """A Constant node's value as a hashable key (dtype, shape, bytes), whatever attribute holds it; else None."""
    if node.op_type != "Constant" or node.input or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    a = node.attribute[0]
    if a.name == "value":
        t = onnx.TensorProto()
        t.CopyFrom(a.t)
        t.name = ""
        if t.data_location == onnx.TensorProto.EXTERNAL:
            return ("c", _digest(t))
        try:
            array = np.asarray(numpy_helper.to_array(t))
        except Exception:  # an odd tensor: its proto then
            return ("c", _digest(t))
    elif a.name in ("value_int", "value_ints"):
        array = np.asarray(a.i if a.name == "value_int" else list(a.ints), np.int64)
    elif a.name in ("value_float", "value_floats"):
        array = np.asarray(a.f if a.name == "value_float" else list(a.floats), np.float32)
    else:
        return ("c", _digest(a))
    return ("c", array.dtype.str, array.shape, hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest())
