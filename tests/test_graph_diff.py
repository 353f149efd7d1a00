"""dsv3c diff on hand-made pairs: identical, renamed, reordered, one attribute, one weight, and lowerings
written by another tool (inlined custom nodes, com.microsoft::MoE, in other naming conventions and without
provenance marks), found from structure alone. What dsv3c's own passes do: tests/test_graph_pipeline.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from dsv3c.cli import main as cli
from dsv3c.errors import UserError
from dsv3c.graph.diff import diff_paths
from dsv3c.graph.diff_types import DiffReport, GraphDiff
from dsv3c.graph.render_text import render_diff
from onnx import numpy_helper as nh

from .fixtures.synthetic import Topology, build_model, inline_custom, lower_moe_ort, write_export


def _run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(cli, "COMMANDS", [*dict.fromkeys([*cli.COMMANDS, "inspect", "diff"])])
    return cli.main(argv)


def _diff(tmp_path: Path, a: onnx.ModelProto, b: onnx.ModelProto) -> GraphDiff:
    onnx.save(a, tmp_path / "a.onnx")
    onnx.save(b, tmp_path / "b.onnx")
    report = diff_paths(tmp_path / "a.onnx", tmp_path / "b.onnx")
    assert len(report.graphs) == 1
    return report.graphs[0]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


@pytest.fixture(scope="module")
def base() -> onnx.ModelProto:
    return build_model(Topology(layers=3, dense_layers=1))


def test_identical_graphs(
    tmp_path: Path, base: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    g = _diff(tmp_path, base, _copy(base))
    assert g.differences == 0 and g.matched == {"name": len(base.graph.node)}
    assert _run_cli(["diff", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")], monkeypatch) == 0
    assert capsys.readouterr().out.strip().endswith("no differences")


def test_reordered_nodes_are_no_difference(tmp_path: Path, base: onnx.ModelProto) -> None:
    b = _copy(base)
    nodes = list(b.graph.node)
    q_a = next(k for k, n in enumerate(nodes) if n.name == "/model/layers.0/self_attn/q_a_proj/MatMul")
    kv_a = next(k for k, n in enumerate(nodes) if n.name == "/model/layers.0/self_attn/kv_a_proj_with_mqa/MatMul")
    nodes.insert(q_a, nodes.pop(kv_a))  # still topological: kv_a reads what q_a reads
    del b.graph.node[:]
    b.graph.node.extend(nodes)
    assert _diff(tmp_path, base, b).differences == 0


def test_renamed_nodes_and_tensors(tmp_path: Path, base: onnx.ModelProto) -> None:
    b = _copy(base)
    _node(b, "/model/layers.1/self_attn/q_b_proj/MatMul").name = "renamed_q_b"  # same output tensor
    sig = _node(b, "/model/layers.0/mlp/act/Sigmoid")  # node and its output renamed: found by its neighbours
    old = sig.output[0]
    sig.name, sig.output[0] = "sigmoid_2", "sigmoid_2_out"
    for n in b.graph.node:
        for k, x in enumerate(n.input):
            if x == old:
                n.input[k] = "sigmoid_2_out"
    g = _diff(tmp_path, base, b)
    assert g.differences == 2, render_diff(DiffReport("a", "b", [g]))
    entries = {e.name_a: e for e in g.nodes}
    first = entries["/model/layers.1/self_attn/q_b_proj/MatMul"]
    assert (first.kind, first.name_b, first.layer, first.matched_by) == ("renamed", "renamed_q_b", 1, "outputs")
    second = entries["/model/layers.0/mlp/act/Sigmoid"]
    assert (second.kind, second.name_b, second.layer, second.matched_by) == ("renamed", "sigmoid_2", 0, "neighbours")


def test_renamed_initializer(tmp_path: Path, base: onnx.ModelProto) -> None:
    b = _copy(base)
    next(t for t in b.graph.initializer if t.name == "model.layers.0.mlp.up_proj.weight").name = "up_w"
    _node(b, "/model/layers.0/mlp/up_proj/MatMul").input[1] = "up_w"
    g = _diff(tmp_path, base, b)
    assert not g.nodes and [(e.kind, e.name_a, e.name_b, e.layer) for e in g.initializers] == [
        ("renamed", "model.layers.0.mlp.up_proj.weight", "up_w", 0)
    ]


def test_one_changed_attribute(tmp_path: Path, base: onnx.ModelProto) -> None:
    b = _copy(base)
    node = _node(b, "/model/layers.2/self_attn/MLAAttention")
    next(a for a in node.attribute if a.name == "softmax_scale").f = 0.25
    g = _diff(tmp_path, base, b)
    assert g.differences == 1
    (e,) = g.nodes
    assert (e.kind, e.op, e.layer) == ("changed", "dsv3c::MLAAttention", 2)
    assert [(c.field, c.before, c.after) for c in e.changes] == [("attribute softmax_scale", "0.125", "0.25")]
    assert "attribute softmax_scale: 0.125 -> 0.25" in render_diff(DiffReport("a", "b", [g]))


def test_one_changed_weight(tmp_path: Path, base: onnx.ModelProto) -> None:
    b = _copy(base)
    name = "model.layers.1.self_attn.o_proj.weight"
    t = next(t for t in b.graph.initializer if t.name == name)
    w = nh.to_array(t).copy()
    w[3, 5] += 0.5
    t.CopyFrom(nh.from_array(w, name))
    g = _diff(tmp_path, base, b)
    assert g.differences == 1 and not g.nodes
    (e,) = g.initializers
    assert (e.kind, e.name_a, e.layer) == ("changed", name, 1)
    assert e.max_abs_diff == pytest.approx(0.5)
    assert e.stats_a is not None and e.stats_b is not None and e.stats_b.mean > e.stats_a.mean
    assert [c.field for c in e.changes] == ["values"]


def test_lowered_by_inlining(tmp_path: Path, base: onnx.ModelProto) -> None:
    g = _diff(tmp_path, base, inline_custom(base))
    assert not g.nodes and not g.initializers
    assert sorted((r.layer, r.op, r.label) for r in g.rewrites) == [
        (0, "dsv3c::MLAAttention", "lowered (inlined, 3 nodes)"),
        (1, "dsv3c::MLAAttention", "lowered (inlined, 3 nodes)"),
        (1, "dsv3c::MoE", "lowered (inlined, 13 nodes)"),
        (2, "dsv3c::MLAAttention", "lowered (inlined, 3 nodes)"),
        (2, "dsv3c::MoE", "lowered (inlined, 13 nodes)"),
    ]
    assert {c.field for c in g.model} == {"opset dsv3c", "function dsv3c::MLAAttention", "function dsv3c::MoE"}


def test_lowered_to_com_microsoft_moe(tmp_path: Path, base: onnx.ModelProto) -> None:
    g = _diff(tmp_path, base, lower_moe_ort(base))
    assert not g.nodes and not g.initializers, render_diff(DiffReport("a", "b", [g]))
    assert [(r.layer, r.label) for r in g.rewrites] == [
        (1, "lowered (to com.microsoft::MoE)"),
        (2, "lowered (to com.microsoft::MoE)"),
    ]
    # the new node, and what was added to feed it: router Transpose + MatMul, fc1 Concat
    assert len(g.rewrites[0].added_nodes) == 4


def test_lowered_without_the_naming_convention(tmp_path: Path, base: onnx.ModelProto) -> None:
    """A lowering that renames every node is still found: by the custom node's output names when they survive,
    else by what now sits between the custom node's matched neighbours."""
    inlined = inline_custom(base)
    for k, node in enumerate(inlined.graph.node):
        if "MLAAttention/" in node.name or "MoE/" in node.name:
            node.name = f"body_{k}"
    renamed = _copy(inlined)  # the outputs renamed too: only the structure is left
    new = {o: f"t{k}" for k, n in enumerate(renamed.graph.node) if n.name.startswith("body_") for o in n.output}
    for node in renamed.graph.node:
        for field in (node.input, node.output):
            for k, x in enumerate(field):
                field[k] = new.get(x, x)
    ort = lower_moe_ort(base)
    for node in ort.graph.node:
        if node.domain == "com.microsoft":
            node.name = "moe_ort"
    for b, label in (
        (inlined, "lowered (inlined, 3 nodes)"),
        (renamed, "lowered (inlined, 3 nodes)"),
        (ort, "lowered (to com.microsoft::MoE)"),
    ):
        g = _diff(tmp_path, base, b)
        assert not g.nodes and not g.initializers, render_diff(DiffReport("a", "b", [g]))
        assert label in {r.label for r in g.rewrites}


def test_export_folders_paired_by_role(
    tmp_path: Path, base: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_export(tmp_path / "a", {"prefill": base, "decode": base})
    write_export(tmp_path / "b", {"prefill": inline_custom(base), "decode": base, "mtp": base})
    report = diff_paths(tmp_path / "a", tmp_path / "b")
    assert [g.role for g in report.graphs] == ["prefill", "decode"] and report.only_b == ["mtp"]
    assert report.graphs[0].rewrites and report.graphs[1].differences == 0 and not report.identical
    out = tmp_path / "report.json"
    assert (
        _run_cli(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--format", "json", "--out", str(out)], monkeypatch)
        == 1
    )
    data = json.loads(out.read_text())
    assert data["identical"] is False and data["only_b"] == ["mtp"]
    assert data["graphs"][0]["rewrites"][0]["label"] == "lowered (inlined, 3 nodes)"
    assert "differences" in capsys.readouterr().out
    assert _run_cli(["diff", str(tmp_path / "a"), str(tmp_path / "a")], monkeypatch) == 0


def test_file_against_folder_is_refused(tmp_path: Path, base: onnx.ModelProto) -> None:
    write_export(tmp_path / "a", {"prefill": base, "decode": base})
    onnx.save(base, tmp_path / "b.onnx")
    with pytest.raises(UserError, match="cannot diff a file against an export folder"):
        diff_paths(tmp_path / "a", tmp_path / "b.onnx")


def test_unrelated_graphs_still_report(tmp_path: Path) -> None:
    """Two different topologies: everything is reported, nothing crashes, and the counts add up."""
    a = build_model(Topology(layers=2))
    b = build_model(Topology(layers=1, hidden=128, vocab=32), seed=1)
    g = _diff(tmp_path, a, b)
    removed = sum(e.kind == "removed" for e in g.nodes)
    added = sum(e.kind == "added" for e in g.nodes)
    assert removed == len(a.graph.node) - sum(g.matched.values())
    assert added == len(b.graph.node) - sum(g.matched.values())
    assert np.isfinite([e.max_abs_diff for e in g.initializers if e.max_abs_diff is not None]).all()


def test_unmatched_nodes_say_why(tmp_path: Path, base: onnx.ModelProto) -> None:
    """An added node says, pass by pass, why no node of A matched it (as a rewrite rule says why it failed)."""
    b = _copy(base)
    node = _node(b, "/model/layers.1/self_attn/o_proj/MatMul")
    extra = onnx.helper.make_node("Relu", [node.output[0]], ["extra_out"], name="/model/layers.1/extra/Relu")
    b.graph.node.append(extra)
    g = _diff(tmp_path, base, b)
    (added,) = [e for e in g.nodes if e.kind == "added"]
    assert (added.op, added.name_b, added.layer) == ("Relu", "/model/layers.1/extra/Relu", 1)
    assert added.why == (
        "no node named '/model/layers.1/extra/Relu' in the other graph; none of its outputs is computed there; "
        "no Relu there reads the same inputs; 1 unmatched Relu here vs 0 there in its layer"
    )
    text = render_diff(DiffReport("a", "b", [g]))
    assert f"added    Relu /model/layers.1/extra/Relu (unmatched: {added.why})" in text


def test_folded_to_a_constant_node(tmp_path: Path) -> None:
    """Nodes of A whose output B computes as a Constant node under the same name are one folded rewrite."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    c1 = nh.from_array(np.ones(2, np.float32), "c1")
    c2 = nh.from_array(np.full(2, 2.0, np.float32), "c2")
    add = helper.make_node("Add", ["c1", "c2"], ["t"], name="sum")
    mul = helper.make_node("Mul", ["x", "t"], ["y"], name="scale")
    a = helper.make_model(helper.make_graph([add, mul], "g", [x], [y], [c1, c2]))
    folded = helper.make_node("Constant", [], ["t"], name="t_const", value=nh.from_array(np.full(2, 3.0, np.float32)))
    b = helper.make_model(helper.make_graph([folded, mul], "g", [x], [y]))
    g = _diff(tmp_path, a, b)
    assert [(rw.kind, rw.label, rw.removed_nodes, rw.added_nodes) for rw in g.rewrites] == [
        ("folded", "folded to constants (1 node)", ["sum"], ["t_const"])
    ]
    assert not g.nodes
