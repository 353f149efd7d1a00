"""Provenance marks (artifact/provenance.py): stamped, saved, loaded, read back."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
from dsv3c.artifact import provenance


def _model() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    node = ir.node("Relu", [x], name="relu")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


def test_marks_survive_save_and_load(tmp_path: Path) -> None:
    model = _model()
    provenance.stamp(
        model.graph.node(0), stage="fp8-weights", rewrite=provenance.quantized("fp8", "block 128"), origin=["a", "b"]
    )
    provenance.record_stage(model, "fp8-weights")
    provenance.record_stage(model, "cleanup")
    ir.save(model, tmp_path / "m.onnx")
    loaded = ir.load(tmp_path / "m.onnx")
    marks = provenance.read(loaded.graph.node(0))
    assert marks == provenance.Provenance(
        "fp8-weights", provenance.Rewrite("quantized", ("fp8", "block 128")), ("a", "b")
    )
    assert str(marks.rewrite) == "quantized(fp8, block 128)"
    assert provenance.model_stages(loaded) == ["fp8-weights", "cleanup"]
    assert provenance.has_provenance(loaded)


def test_existing_marks_stay_unless_overwritten() -> None:
    node = _model().graph.node(0)
    provenance.stamp(node, stage="first")
    provenance.stamp(node, stage="second", rewrite="merged")
    assert provenance.read(node).stage == "first"
    assert provenance.read(node).rewrite == provenance.Rewrite("merged")
    provenance.stamp(node, stage="second", overwrite=True)
    assert provenance.read(node).stage == "second"


def test_unmarked_graph_has_no_provenance() -> None:
    model = _model()
    assert not provenance.read(model.graph.node(0)).stamped
    assert not provenance.has_provenance(model)


def test_rewrite_text_round_trips() -> None:
    for text in ["merged", "lowered(com.microsoft.MoE)", "quantized(fp8, block 128)", "inlined(dsv3c.MLA)"]:
        assert str(provenance.Rewrite.parse(text)) == text
    assert provenance.Rewrite.parse("not a rewrite!").kind == "not a rewrite!"
