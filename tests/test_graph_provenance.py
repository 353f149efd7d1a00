"""Provenance marks (artifact/provenance.py): stamped, saved, loaded, read back."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest
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


# ---- the real pipeline stamps what it creates -------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_folders(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from dsv3c.passes.lower import lower_folder
    from dsv3c.passes.pipelines import QuantizeOptions, Target
    from dsv3c.passes.quantize import quantize_folder

    root = tmp_path_factory.mktemp("provenance")
    out = {"export": tiny_export, "quantized": root / "q", "ort": root / "ort"}
    quantize_folder(tiny_export, out["quantized"], QuantizeOptions())
    lower_folder(out["quantized"], out["ort"], Target.ORT)
    return out


def _prefill(folder: Path) -> ir.Model:
    return ir.load(folder / "prefill.onnx")


def test_export_is_unmarked(pipeline_folders: dict[str, Path]) -> None:
    model = _prefill(pipeline_folders["export"])
    assert not provenance.has_provenance(model)


def test_quantize_marks_every_node_it_adds(pipeline_folders: dict[str, Path]) -> None:
    from dsv3c.passes.pipelines import QuantizeOptions, quantize_pipeline

    before = {n.name for n in _prefill(pipeline_folders["export"]).graph}
    model = _prefill(pipeline_folders["quantized"])
    assert provenance.model_stages(model) == [s.name for s in quantize_pipeline(QuantizeOptions())]
    added = [n for n in model.graph if n.name not in before]
    assert len(added) > 100
    kept = [n for n in model.graph if n.name in before]
    # what the export wrote stays unmarked, except where the cleanup's CSE says a node absorbed its duplicates
    # (rewrite `merged`, no stage: no stage made the node), naming them: nodes of the export gone from the graph
    gone = before - {n.name for n in model.graph}
    kept_marks = [provenance.read(n) for n in kept if provenance.read(n).stamped]
    assert kept and all(m.stage is None and m.rewrite == provenance.Rewrite(provenance.MERGED) for m in kept_marks)
    assert kept_marks and all(m.origin and set(m.origin) <= gone for m in kept_marks)
    marks = [provenance.read(n) for n in added]
    assert all(m.stage is not None for m in marks)
    by_stage = {m.stage for m in marks}
    assert {"fp8-weights", "fp8-activations"} <= by_stage
    weights = [(n, m) for n, m in zip(added, marks, strict=True) if m.stage == "fp8-weights"]
    assert {str(m.rewrite) for _, m in weights} == {"quantized(fp8, block 128)"}
    for node, m in weights:  # named after the weight they dequantize, which is their origin
        assert len(m.origin) == 1 and node.name.startswith(m.origin[0].removesuffix(".weight") + "/")
        assert m.origin[0] in model.graph.initializers
    acts = [m for m in marks if m.stage == "fp8-activations"]
    assert {str(m.rewrite) for m in acts} == {"quantized(fp8, 1x128 tiles (online))"}
    matmuls = {n.name for n in model.graph if n.op_type == "MatMul"}
    assert all(m.origin and set(m.origin) <= matmuls for m in acts)  # the linears whose input they quantize


def test_lowering_marks_what_it_replaced(pipeline_folders: dict[str, Path]) -> None:
    quantized = _prefill(pipeline_folders["quantized"])
    moes = {n.name for n in quantized.graph if n.op_type == "MoE" and n.domain == "dsv3c"}
    mlas = {n.name for n in quantized.graph if n.op_type == "MLAAttention"}
    assert moes and mlas
    model = _prefill(pipeline_folders["ort"])
    stages = provenance.model_stages(model)
    assert stages[:2] == ["fp8-weights", "fp8-activations"] and "moe-to-com-microsoft" in stages
    lowered: dict[str, set[str]] = {}
    for node in model.graph:
        m = provenance.read(node)
        if m.stage in ("moe-to-com-microsoft", "inline-custom"):
            assert m.rewrite is not None and len(m.origin) == 1, node
            lowered.setdefault(m.origin[0], set()).add(str(m.rewrite))
    assert {k for k, v in lowered.items() if v == {"lowered(com.microsoft.MoE)"}} == moes
    assert {k for k, v in lowered.items() if v == {"inlined(dsv3c.MLAAttention)"}} == mlas
    ms = [n for n in model.graph if n.op_type == "MoE" and n.domain == "com.microsoft"]
    assert ms and all(provenance.read(n).origin[0] in moes for n in ms)
