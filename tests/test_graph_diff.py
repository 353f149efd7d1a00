"""dsv3c diff on hand-made pairs: identical, renamed, reordered, one attribute, one weight, and the
pipeline's own rewrites (fp8 Q/DQ, inlined custom nodes, com.microsoft::MoE), grouped per layer."""

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
from dsv3c.graph.synthetic import Topology, build_model, inline_custom, lower_moe_ort, quantize_fp8, write_export
from onnx import numpy_helper as nh


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


@pytest.mark.parametrize("data", [True, False], ids=["weights", "weights-none"])
def test_quantized_linears_grouped_per_layer(tmp_path: Path, data: bool) -> None:
    a = build_model(Topology(layers=3, dense_layers=1, data=data))
    g = _diff(tmp_path, a, quantize_fp8(a))
    assert not g.nodes and not g.initializers and not g.model, render_diff(DiffReport("a", "b", [g]))
    labels = {(r.layer, r.label) for r in g.rewrites}
    assert labels == {(layer, "quantized (fp8, block 128)") for layer in range(3)}
    per_layer = {layer: [r.target for r in g.rewrites if r.layer == layer] for layer in range(3)}
    assert per_layer[0] == [
        "self_attn.q_a_proj",
        "self_attn.q_b_proj",
        "self_attn.kv_a_proj_with_mqa",
        "self_attn.kv_b_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    assert "mlp.experts" in per_layer[1] and "mlp.shared_experts.down_proj" in per_layer[2]
    rewrites = {(r.layer, r.target): r for r in g.rewrites}
    o_proj = rewrites[0, "self_attn.o_proj"]
    assert o_proj.changed_initializers == ["model.layers.0.self_attn.o_proj.weight"]  # float -> fp8, same name
    assert o_proj.added_initializers == ["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    assert {n.rsplit("/", 1)[-1] for n in o_proj.added_nodes} >= {"dequantize", "scale_expand", "quantize", "amax"}
    assert (o_proj.op, o_proj.weight_shapes, o_proj.scale_shapes) == ("MatMul", [[256, 256]], [[2, 2]])
    assert o_proj.activation == "fp8, 1x128 tiles (online)" and not o_proj.weight_only
    kv_a = rewrites[0, "self_attn.kv_a_proj_with_mqa"]  # reads q_a_proj's input: one Q/DQ for both
    assert kv_a.shared_activation == "self_attn.q_a_proj" and not any("/input/" in n for n in kv_a.added_nodes)
    experts, kv_b = rewrites[1, "mlp.experts"], rewrites[1, "self_attn.kv_b_proj"]
    assert experts.weight_only and kv_b.weight_only and experts.op == "dsv3c::MoE"
    assert experts.weights == [f"model.layers.1.mlp.experts.{p}_proj.weight" for p in ("gate", "up", "down")]
    assert experts.scale_shapes == [[4, 1, 2], [4, 1, 2], [4, 2, 1]]
    text = render_diff(DiffReport("a", "b", [g]))
    assert "layer 1:\n    quantized (fp8, block 128): 9 linears (7 with fp8 activations, 2 weight-only)" in text
    assert "self_attn.o_proj (MatMul): weight float8e4m3fn[256, 256], scale [2, 2]; activations fp8" in text
    assert "added" not in text.replace("+", "")


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


def test_quantized_then_lowered(tmp_path: Path, base: onnx.ModelProto) -> None:
    g = _diff(tmp_path, base, inline_custom(quantize_fp8(base)))
    assert not g.nodes and not g.initializers, render_diff(DiffReport("a", "b", [g]))
    kinds = {(r.kind, r.layer) for r in g.rewrites}
    assert kinds == {(k, layer) for k in ("quantized", "lowered") for layer in range(3)}


def test_export_folders_paired_by_role(
    tmp_path: Path, base: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_export(tmp_path / "a", {"prefill": base, "decode": base})
    write_export(tmp_path / "b", {"prefill": quantize_fp8(base), "decode": base, "mtp": base})
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
    assert data["graphs"][0]["rewrites"][0]["label"] == "quantized (fp8, block 128)"
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
