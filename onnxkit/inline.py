"""Inline a custom node's reference body (a model-local function) in its place: the one inliner.

An inlined node of custom node `N` is named `N/<body node>` (a body node's name, or its first output's
name), and its values `N/<body value>`, so the diff tool recognises what came from where; the custom
node's outputs keep their names. Attribute references in the body (`softmax_scale`, `top_k`, ...) take
the custom node's values. onnx-ir's InlinePass does the same but names the nodes `node`, `node_2`, ...
Every inlined node is marked `inlined(<domain>.<op>)` (or the caller's rewrite) with the custom node as
its origin (artifact/provenance.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.artifact.provenance import Rewrite


def _resolve(attr: ir.Attr, call: ir.Node, function: ir.Function) -> ir.Attr | None:
    if not attr.is_ref():
        return attr
    assert attr.ref_attr_name is not None
    given = call.attributes.get(attr.ref_attr_name)
    if given is None:
        default = function.attributes.get(attr.ref_attr_name)
        given = default if default is not None and default.value is not None else None
    if given is None:
        return None  # an unset optional attribute: the body node goes without it
    return ir.Attr(attr.name, given.type, given.value)


def inline_call(
    graph: ir.Graph,
    call: ir.Node,
    function: ir.Function,
    prefix: str | None = None,
    rewrite: Rewrite | None = None,
    origin: ir.Node | Sequence[ir.Node] | None = None,
) -> tuple[list[ir.Node], list[ir.Value]]:
    """Replace `call` by a copy of `function`'s body; returns the new nodes (in order) and the outputs.

    The new nodes are marked `rewrite` (default: inlined) with `origin` (default: `call`) as their origin.
    """
    prefix = prefix or call.name or f"{call.op_type}_{id(call)}"
    rewrite = rewrite or provenance.inlined(f"{call.domain}.{call.op_type}" if call.domain else call.op_type)
    origin_names = provenance.origin_names(origin if origin is not None else call)
    values: dict[ir.Value, ir.Value | None] = {}
    for i, formal in enumerate(function.inputs):
        values[formal] = call.inputs[i] if i < len(call.inputs) else None
    nodes = []
    for body in function:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in body.attributes.values()):
            raise NotImplementedError(f"inlining {function.name}: body node {body.op_type} has a subgraph")
        attrs = [a for a in (_resolve(x, call, function) for x in body.attributes.values()) if a is not None]
        inputs = [values[v] if v is not None else None for v in body.inputs]
        label = body.name or (body.outputs[0].name if body.outputs and body.outputs[0].name else body.op_type.lower())
        node = ir.Node(
            body.domain,
            body.op_type,
            inputs,
            attrs,
            overload=body.overload,
            num_outputs=len(body.outputs),
            version=body.version,
            name=f"{prefix}/{label}",
        )
        provenance.stamp(node, rewrite=rewrite, origin=origin_names)
        for old, new in zip(body.outputs, node.outputs, strict=True):
            new.name = f"{prefix}/{old.name}" if old.name else None
            new.type, new.shape = old.type, old.shape
            values[old] = new
        nodes.append(node)
    outputs = [values[v] for v in function.outputs]
    if any(v is None for v in outputs):
        raise ValueError(f"bug: the body of {function.name} leaves an output undefined")
    ir.convenience.replace_nodes_and_values(
        graph,
        insertion_point=call,
        old_nodes=[call],
        new_nodes=nodes,
        old_values=call.outputs,
        new_values=outputs,  # type: ignore[arg-type]
    )
    return nodes, outputs  # type: ignore[return-value]
