"""The one node builder for graphs on onnx_ir (the exporter's FP8 form and every pass): named nodes and
values, constants, insertion, on onnx_ir's tape.

Every node a Builder makes carries the provenance marks it was given (artifact/provenance.py): what the
pass did (`rewrite`) and what the new nodes replace (`origin`); the pipeline adds the stage's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.artifact.provenance import Rewrite


class Builder:
    """Collects new nodes named `{prefix}/{what}` (values the same) and inserts them into a graph.

    `rewrite` and `origin` are stamped on every node it makes: e.g. `Builder(moe.name,
    rewrite=provenance.lowered("com.microsoft.MoE"), origin=moe)`.
    """

    def __init__(
        self,
        prefix: str,
        rewrite: Rewrite | str | None = None,
        origin: ir.Node | str | Sequence[ir.Node | str] = (),
    ) -> None:
        self.prefix = prefix
        self.rewrite = rewrite
        self.origin = provenance.origin_names(origin)  # names now: the origin node may leave the graph
        self.tape = ir.tape.Tape()
        self._count: dict[str, int] = {}

    @property
    def nodes(self) -> list[ir.Node]:
        """The nodes made since the last insertion, in order."""
        return list(self.tape.nodes)

    def _name(self, what: str) -> str:
        n = self._count.get(what, 0)
        self._count[what] = n + 1
        return f"{self.prefix}/{what}" if n == 0 else f"{self.prefix}/{what}_{n}"

    def op(
        self,
        op_type: str,
        *inputs: ir.Value | None,
        name: str | None = None,
        domain: str = "",
        num_outputs: int = 1,
        **attrs: Any,
    ) -> Any:
        """Add a node; returns its output value (or the tuple of them when num_outputs > 1)."""
        node_name = self._name(name or op_type.lower())
        marks = provenance.props(rewrite=self.rewrite, origin=self.origin)
        outputs = self.tape.op_multi_out(
            op_type,
            list(inputs),
            attrs or None,
            num_outputs=num_outputs,
            domain=domain,
            name=node_name,
            metadata_props=marks or None,
        )
        for i, out in enumerate(outputs):
            out.name = node_name if num_outputs == 1 else f"{node_name}:{i}"
        return outputs[0] if num_outputs == 1 else tuple(outputs)

    def const(self, value: Any, dtype: Any = None, name: str = "const") -> ir.Value:
        """A Constant node holding `value` (numpy-convertible; ints default to int64)."""
        array = np.asarray(value, dtype=dtype)
        if dtype is None and array.dtype.kind == "i":
            array = array.astype(np.int64)
        elif dtype is None and array.dtype.kind == "f":
            array = array.astype(np.float32)
        out: ir.Value = self.op("Constant", name=name, value=ir.tensor(array))
        return out

    def ints(self, *values: int, name: str = "shape") -> ir.Value:
        return self.const(np.array(values, dtype=np.int64), name=name)

    def insert_before(self, graph: ir.Graph, node: ir.Node) -> None:
        if self.tape.nodes:
            graph.insert_before(node, self.tape.nodes)
            self.tape = ir.tape.Tape()

    def replace(self, graph: ir.Graph, node: ir.Node, out: ir.Value) -> None:
        """The tape's nodes in place of `node`, whose one output becomes `out` (which takes its shape and type)."""
        old = node.outputs[0]
        out.shape, out.type = old.shape, old.type
        self.insert_before(graph, node)
        ir.convenience.replace_nodes_and_values(
            graph, insertion_point=node, old_nodes=[node], new_nodes=[], old_values=[old], new_values=[out]
        )

    def insert_after(self, graph: ir.Graph, node: ir.Node) -> None:
        if self.tape.nodes:
            graph.insert_after(node, self.tape.nodes)
            self.tape = ir.tape.Tape()


def first_user(graph: ir.Graph, users: Sequence[ir.Node]) -> ir.Node:
    """Of `users` (nodes of `graph`), the one that comes first in graph order."""
    wanted = set(users)
    for node in graph:
        if node in wanted:
            return node
    raise ValueError("bug: none of the users is in the graph")


def static_dims(shape: ir.ShapeProtocol | None) -> tuple[int, ...]:
    """The dims of a fully static shape; ValueError when a dim is symbolic or the shape unknown."""
    if shape is None or not all(isinstance(d, int) for d in shape.dims):
        raise ValueError(f"bug: expected a static shape, got {shape}")
    return tuple(int(d) for d in shape.dims)  # type: ignore[arg-type]


def initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    """Register a new initializer `name` holding `tensor` (replacing none: the name must be free)."""
    if name in graph.initializers:
        raise ValueError(f"bug: initializer {name} exists already")
    value = ir.Value(
        name=name, shape=ir.Shape(static_dims(tensor.shape)), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value
