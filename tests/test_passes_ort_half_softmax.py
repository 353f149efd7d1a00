"""passes/ort_half_softmax.py: which float32 softmaxes between Casts become a softmax of the 16-bit scores."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from dsv3c.passes.ort_half_softmax import HalfSoftmaxPass
from onnx import TensorProto, helper

HALF = {"bf16": TensorProto.BFLOAT16, "fp16": TensorProto.FLOAT16}


def _model(half: int, fill: float | None, out_as: int | None = None) -> ir.Model:
    """s (half) -> Cast(float) -> [Where(visible, ., fill)] -> Softmax -> Cast(out_as, default half)."""
    nodes = [helper.make_node("Cast", ["s"], ["wide"], to=TensorProto.FLOAT)]
    scores = "wide"
    if fill is not None:
        nodes.append(
            helper.make_node("Constant", [], ["fill"], value=helper.make_tensor("f", TensorProto.FLOAT, [], [fill]))
        )
        nodes.append(helper.make_node("Where", ["visible", "wide", "fill"], ["masked"]))
        scores = "masked"
    nodes.append(helper.make_node("Softmax", [scores], ["p32"], axis=-1))
    nodes.append(helper.make_node("Cast", ["p32"], ["p"], to=out_as or half))
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("s", half, [1, 4, 1, 8]),
            helper.make_tensor_value_info("visible", TensorProto.BOOL, [1, 1, 1, 8]),
        ],
        [helper.make_tensor_value_info("p", out_as or half, [1, 4, 1, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))  # the Casts' output types


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize("half", ["bf16", "fp16"])
@pytest.mark.parametrize("fill", [float("-inf"), None])
def test_the_casts_go(half: str, fill: float | None) -> None:
    model = _model(HALF[half], fill)
    assert HalfSoftmaxPass()(model).modified
    assert "Cast" not in _ops(model) and _ops(model)[-1] == "Softmax"
    (softmax,) = (n for n in model.graph if n.op_type == "Softmax")
    assert softmax.outputs[0].name == "p" and softmax.outputs[0] in model.graph.outputs
    assert softmax.inputs[0].dtype == ir.DataType(HALF[half])  # type: ignore[union-attr]
    if fill is not None:
        (where,) = (n for n in model.graph if n.op_type == "Where")
        fill_value = where.inputs[2].producer().attributes["value"].as_tensor()  # type: ignore[union-attr]
        assert fill_value.dtype == ir.DataType(HALF[half]) and np.isneginf(fill_value.numpy().astype(np.float32))


def test_a_fill_the_half_type_cannot_hold_stays_in_float32() -> None:
    """-1e9 is not a float16 (its range ends at 65504) nor exactly a bf16: the float32 form stays."""
    for half in HALF.values():
        model = _model(half, -1e9)
        assert not HalfSoftmaxPass()(model).modified
        assert _ops(model).count("Cast") == 2


def test_probabilities_rounded_to_another_type_keep_their_casts() -> None:
    model = _model(HALF["bf16"], float("-inf"), out_as=TensorProto.FLOAT16)  # rounded to another type
    assert not HalfSoftmaxPass()(model).modified
