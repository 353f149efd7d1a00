"""graph/index.py's view walks onnx_ir's values: producers and readers of the top level only, in graph order."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from dsv3c.graph.index import GraphIndex, elem_type


def _graph() -> tuple[ir.Graph, dict[str, ir.Node]]:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    w = ir.Value(name="w", const_value=ir.tensor(np.ones(2, np.float32), name="w"))
    cond = ir.Value(name="cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    add = ir.Node("", "Add", [x, w], name="add")
    # a subgraph reads `add`'s output too: the view leaves that use out (subgraphs are attributes)
    inner = ir.Node("", "Neg", [add.outputs[0]], name="inner_neg")
    branch = ir.Graph([], [inner.outputs[0]], nodes=[inner], name="branch")
    then = ir.Node(
        "",
        "If",
        [cond],
        attributes=[ir.AttrGraph("then_branch", branch), ir.AttrGraph("else_branch", branch)],
        name="if",
    )
    mul = ir.Node("", "Mul", [add.outputs[0], add.outputs[0]], name="mul")
    relu = ir.Node("", "Relu", [x], name="relu")
    for node, out in ((add, "a"), (then, "t"), (mul, "m"), (relu, "r")):
        node.outputs[0].name = out
    graph = ir.Graph(
        [x, cond], [mul.outputs[0], then.outputs[0]], nodes=[add, then, mul, relu], initializers=[w], name="g"
    )
    return graph, {n.name or "": n for n in (add, then, mul, relu, inner)}


def test_producers_and_readers_are_onnx_irs_at_the_top_level() -> None:
    graph, n = _graph()
    index = GraphIndex(graph)
    a = n["add"].outputs[0]
    assert index.producer(a) is n["add"]
    assert index.producer(graph.initializers["w"]) is None and index.producer(None) is None
    assert index.uses(a) == [(n["mul"], 0), (n["mul"], 1)]  # not the If body's Neg
    assert index.readers(n["add"]) == [n["mul"]]
    x = graph.inputs[0]
    assert index.readers(n["relu"]) == [] and index.uses(x) == [(n["add"], 0), (n["relu"], 0)]
    assert index.made("m") is n["mul"] and index.made("w") is None and index.made("") is None
    assert n["inner_neg"] not in index
    assert index.is_initializer(graph.initializers["w"]) and not index.is_initializer(x)
    assert index.is_output(n["mul"]) and not index.is_output(n["relu"])
    assert index.in_order({n["relu"], n["add"], n["mul"]}) == [n["add"], n["mul"], n["relu"]]
    assert elem_type(x) == int(ir.DataType.FLOAT)


def test_labels_and_layers_come_from_names() -> None:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    named = ir.Node("", "Relu", [x], name="model.layers.3.mlp/act")
    unnamed = ir.Node("", "Neg", [named.outputs[0]])
    named.outputs[0].name, unnamed.outputs[0].name = "h", "model.layers.4.out"
    outside = ir.Node("", "Abs", [unnamed.outputs[0]], name="/model/norm/Abs")
    outside.outputs[0].name = "y"
    graph = ir.Graph([x], [outside.outputs[0]], nodes=[named, unnamed, outside], name="g")
    unnamed.name = None  # onnx_ir names nodes added without one; a file may still hold unnamed nodes
    index = GraphIndex(graph)
    assert index.label(named) == "model.layers.3.mlp/act" and index.label(unnamed) == "Neg(model.layers.4.out)"
    # a scoped name without a layer is outside the layers even when it reads a layer's output
    assert [index.layer(node) for node in graph] == [3, 4, None]
