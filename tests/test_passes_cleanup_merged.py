"""The cleanup's CSE stamps what it merged: every node that absorbed duplicates says `merged` and names them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.artifact.export_folder import read_export
from dsv3c.passes.cleanup import cleanup_stages
from dsv3c.passes.merge_duplicates import MergeDuplicatesPass
from dsv3c.passes.stages import run_pipeline


def _graph() -> tuple[ir.Model, dict[str, ir.Node]]:
    """x -> Neg twice -> Relu each (a chain of duplicates); Transpose with perms a, b, a; two equal
    Constants and a third one that differs; y = the sum of everything."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 2]))
    nodes: dict[str, ir.Node] = {}

    def add(name: str, op: str, inputs: list[ir.Value], **attrs: object) -> ir.Value:
        node = ir.node(op, inputs, attributes=attrs, name=name)
        nodes[name] = node
        return node.outputs[0]

    relu1 = add("relu1", "Relu", [add("neg1", "Neg", [x])])
    relu2 = add("relu2", "Relu", [add("neg2", "Neg", [x])])
    t1 = add("t1", "Transpose", [x], perm=[1, 0])
    t2 = add("t2", "Transpose", [x], perm=[0, 1])
    t3 = add("t3", "Transpose", [x], perm=[1, 0])
    c1 = add("c1", "Constant", [], value=ir.tensor(np.ones((2, 2), np.float32)))
    c2 = add("c2", "Constant", [], value=ir.tensor(np.ones((2, 2), np.float32)))
    c3 = add("c3", "Constant", [], value=ir.tensor(np.zeros((2, 2), np.float32)))
    total = relu1
    for i, v in enumerate([relu2, t1, t2, t3, c1, c2, c3]):
        total = add(f"sum{i}", "Add", [total, v])
    graph = ir.Graph([x], [total], nodes=list(nodes.values()), opset_imports={"": 21}, name="g")
    return ir.Model(graph, ir_version=10), nodes


def _merged(model: ir.Model) -> dict[str, provenance.Provenance]:
    marks = {n.name: provenance.read(n) for n in model.graph}
    return {name: m for name, m in marks.items() if m.rewrite is not None and m.rewrite.kind == provenance.MERGED}


def test_survivors_name_the_duplicates_they_absorbed() -> None:
    model, nodes = _graph()
    provenance.stamp(nodes["c1"], stage="fp8-weights", rewrite=provenance.quantized("fp8", "block 128"))
    assert MergeDuplicatesPass()(model).modified
    left = {n.name for n in model.graph}
    assert {"neg2", "relu2", "t3", "c2"}.isdisjoint(left) and {"t2", "c3"} <= left  # what onnx_ir's CSE did
    merged = _merged(model)
    assert {name: m.origin for name, m in merged.items()} == {"neg1": ("neg2",), "relu1": ("relu2",), "t1": ("t3",)}
    assert all(m.stage is None for m in merged.values())  # the cleanup did not create them
    # a survivor a stage made keeps that stage's marks, so its rewrite's group stays whole; what it absorbed
    # goes under a key of its own
    assert provenance.read(nodes["c1"]) == provenance.Provenance(
        "fp8-weights", provenance.quantized("fp8", "block 128"), (), merged_from=("c2",)
    )
    assert nodes["c1"].metadata_props[provenance.MERGED_FROM] == "c2"
    assert not provenance.read(nodes["t2"]).stamped and not provenance.read(nodes["c3"]).stamped


def test_a_stage_made_survivor_collects_what_later_cleanups_merge_into_it() -> None:
    """A stage's node absorbs a duplicate, then (another cleanup) one that had absorbed others itself: its
    `merged_from` grows and its stage marks never change."""
    model, nodes = _graph()
    provenance.stamp(nodes["neg1"], stage="moe-body-topk", rewrite="rewritten", origin=["moe"])
    stage_marks = {k: v for k, v in nodes["neg1"].metadata_props.items() if k != provenance.MERGED_FROM}
    MergeDuplicatesPass()(model)
    assert provenance.read(nodes["neg1"]).merged_from == ("neg2",)
    assert _merged(model)["relu1"].origin == ("relu2",)
    x = model.graph.inputs[0]
    neg3 = ir.node("Neg", [x], name="neg3")
    neg3.metadata_props[provenance.MERGED_FROM] = "neg8"  # a stage's node that absorbed neg8 earlier
    out = ir.node("Add", [model.graph.outputs[0], neg3.outputs[0]], name="last")
    model.graph.extend([neg3, out])
    model.graph.outputs[0] = out.outputs[0]
    assert MergeDuplicatesPass()(model).modified
    assert provenance.read(nodes["neg1"]).merged_from == ("neg2", "neg3", "neg8")
    assert {k: v for k, v in nodes["neg1"].metadata_props.items() if k != provenance.MERGED_FROM} == stage_marks


def test_a_later_cleanup_adds_to_the_origin() -> None:
    model, nodes = _graph()
    MergeDuplicatesPass()(model)
    # a new duplicate of relu1 (already marked merged), and one of neg1 that carries neg1's earlier merge
    x = model.graph.inputs[0]
    neg3 = ir.node("Neg", [x], name="neg3")
    provenance.stamp(neg3, rewrite="merged", origin=["neg9"])
    relu3 = ir.node("Relu", [nodes["neg1"].outputs[0]], name="relu3")
    out = ir.node("Add", [model.graph.outputs[0], relu3.outputs[0]], name="last")
    out2 = ir.node("Add", [out.outputs[0], neg3.outputs[0]], name="last2")
    model.graph.extend([neg3, relu3, out, out2])
    model.graph.outputs[0] = out2.outputs[0]
    assert MergeDuplicatesPass()(model).modified
    merged = _merged(model)
    assert merged["relu1"].origin == ("relu2", "relu3")
    assert merged["neg1"].origin == ("neg2", "neg3", "neg9")


def test_the_cleanup_of_a_real_export_accounts_for_every_removed_duplicate(tiny_export: Path) -> None:
    graphs = read_export(tiny_export)
    before = {role: {n.name for n in m.graph} for role, m in graphs.models.items()}
    records = run_pipeline(graphs, cleanup_stages())
    cse = next(r for r in records if r.name == "cse")
    for role, model in graphs.models.items():
        after = {n.name for n in model.graph}
        merged = _merged(model)
        if not cse.modified[role]:
            assert not merged
            continue
        origins = [name for m in merged.values() for name in m.origin]
        origins += [name for n in model.graph for name in provenance.read(n).merged_from]
        assert merged and all(m.stage is None for m in merged.values()), role
        assert len(origins) == len(set(origins)) and set(origins) <= before[role] - after, role
        assert set(merged) <= after  # the survivors are there, named as they were
    assert any(cse.modified.values())  # the tiny export has duplicates (shape computations across layers)
