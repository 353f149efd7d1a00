"""Compose a graph from traced blocks: each distinct block is traced once and instanced per layer.

Tracing costs about a second per layer and graph; the V3 model has 61 layers of only two kinds (dense,
MoE). So trace.py traces one block per kind and `Composer` stamps out instances: every value and node
of instance `prefix` is renamed `prefix/name`, the block's inputs and outputs are wired to the given
graph-level names, and its weights get the instance's names (`self_attn.q_a_proj.weight` ->
`model.layers.7.self_attn.q_a_proj.weight`). A block's inline constants are shared by its instances.
The composed graph is what a full trace gives, with layer-scoped names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx


@dataclass
class Block:
    """A traced module. Its weights are graph inputs named in `weights` (declared, never with data)."""

    name: str
    proto: onnx.ModelProto
    weights: list[str]


@dataclass
class Composer:
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    constants: dict[str, onnx.TensorProto] = field(default_factory=dict)
    value_info: list[onnx.ValueInfoProto] = field(default_factory=list)
    weights: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)  # name -> declared type, first-use order
    io: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)  # graph-level names -> type
    opsets: dict[str, int] = field(default_factory=dict)

    def add(
        self,
        block: Block,
        prefix: str,
        inputs: dict[str, str],
        outputs: dict[str, str],
        weight_prefix: str = "",
        weight_names: dict[str, str] | None = None,
    ) -> None:
        """Instance `block`: its inputs/outputs wired to graph names, its weights renamed."""
        g, weight_names = block.proto.graph, weight_names or {}
        rename: dict[str, str] = {"": ""}
        for value in g.input:
            if value.name in block.weights:
                new = weight_names.get(value.name, weight_prefix + value.name)
                self.weights.setdefault(new, _renamed(value, new))
            else:
                new = inputs[value.name]
                self.io.setdefault(new, _renamed(value, new))
            rename[value.name] = new
        for value in g.output:
            rename[value.name] = outputs[value.name]
            self.io[outputs[value.name]] = _renamed(value, outputs[value.name])
        for tensor in g.initializer:
            new = f"{block.name}/{tensor.name}"
            rename[tensor.name] = new
            if new not in self.constants:
                copy = onnx.TensorProto()
                copy.CopyFrom(tensor)
                copy.name = new
                self.constants[new] = copy
        for node in g.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise NotImplementedError(f"block {block.name}: node {node.name} has a subgraph")
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{prefix}/{node.name}"
            copy.input[:] = [rename.get(x, f"{prefix}/{x}") for x in node.input]
            copy.output[:] = [rename.setdefault(x, f"{prefix}/{x}") for x in node.output]
            self.nodes.append(copy)
        self.value_info += [_renamed(v, rename.get(v.name, f"{prefix}/{v.name}")) for v in g.value_info]
        for opset in block.proto.opset_import:
            self.opsets[opset.domain] = max(self.opsets.get(opset.domain, 0), opset.version)

    def model(self, name: str, inputs: list[str], outputs: list[str], template: onnx.ModelProto) -> onnx.ModelProto:
        """The composed model (weights declared in `self.weights`, not yet initializers)."""
        graph = onnx.helper.make_graph(
            self.nodes,
            name,
            [self.io[n] for n in inputs],
            [self.io[n] for n in outputs],
            initializer=list(self.constants.values()),
            value_info=self.value_info,
        )
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in sorted(self.opsets.items())]
        model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=template.ir_version)
        return model


def _renamed(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    copy.name = name
    return copy


def rename_dim(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a symbolic dim (also inside expressions such as `past + seq`) in every type of the graph."""
    pattern = re.compile(rf"\b{re.escape(old)}\b")
    g = model.graph
    for value in [*g.input, *g.output, *g.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(new, dim.dim_param)
