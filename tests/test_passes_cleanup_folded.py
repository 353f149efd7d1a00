"""The cleanup's constant folding and TensorRT's lifting of constants say what they replaced: what the folder makes
is marked `folded` with the nodes it replaced as its origin (a Constant node on itself, an initializer on its
value, saved in the graph's value_info); an initializer lifted from a Constant carries its stage, `lifted` and the
Constant's name."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.passes.cleanup import FoldConstantsPass, LiftConstantsPass


def _shape_chain() -> tuple[ir.Model, dict[str, ir.Node]]:
    """y = Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])) with x of static shape [2, 3]."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    nodes: dict[str, ir.Node] = {}

    def add(name: str, op: str, inputs: list[ir.Value], **attrs: object) -> ir.Value:
        node = ir.node(op, inputs, attributes=attrs, name=name)
        node.outputs[0].name = f"{name}_out"
        nodes[name] = node
        return node.outputs[0]

    zero = add("zero", "Constant", [], value=ir.tensor(np.array(0, np.int64)))
    axes = add("axes", "Constant", [], value=ir.tensor(np.array([0], np.int64)))
    minus_one = add("minus_one", "Constant", [], value=ir.tensor(np.array([-1], np.int64)))
    dim = add("gather", "Gather", [add("shape", "Shape", [x]), zero], axis=0)
    target = add("concat", "Concat", [add("unsqueeze", "Unsqueeze", [dim, axes]), minus_one], axis=0)
    y = add("reshape", "Reshape", [x, target])
    graph = ir.Graph([x], [y], nodes=list(nodes.values()), opset_imports={"": 21}, name="g")
    return ir.Model(graph, ir_version=10), nodes


def test_folded_values_name_the_nodes_they_replaced() -> None:
    """The folder turns the shape chain into an initializer: it carries the stage, `folded` and the nodes it
    replaced, through saving."""
    model, nodes = _shape_chain()
    assert FoldConstantsPass("fold-constants")(model).modified
    graph = model.graph
    target = graph.node(-1).inputs[1]  # what Reshape reads now
    assert target is not None and target.name in graph.initializers and target.producer() is None
    saved = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    marks = provenance.read_props(saved.graph.initializers[target.name].metadata_props)
    assert marks.stage == "fold-constants" and marks.rewrite == provenance.Rewrite(provenance.FOLDED)
    assert {"concat", "unsqueeze", "gather", "shape"} <= set(marks.origin)
    assert set(marks.origin) <= set(nodes) - {n.name for n in graph}  # only nodes the folding removed
    assert not provenance.read(graph.node(-1)).stamped  # the Reshape it did not make stays unmarked


def test_lifted_initializers_carry_their_marks_through_saving() -> None:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    constant = ir.node("Constant", [], attributes={"value": ir.tensor(np.ones(2, np.float32))}, name="c")
    constant.outputs[0].name = "c_out"
    add = ir.node("Add", [x, constant.outputs[0]], name="add")
    graph = ir.Graph([x], add.outputs, nodes=[constant, add], opset_imports={"": 21}, name="g")
    model = ir.Model(graph, ir_version=10)
    assert LiftConstantsPass("lift-constants")(model).modified
    assert [n.name for n in model.graph] == ["add"]
    saved = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    marks = provenance.read_props(saved.graph.initializers["c_out"].metadata_props)
    assert marks == provenance.Provenance("lift-constants", provenance.Rewrite(provenance.LIFTED), ("c",))
