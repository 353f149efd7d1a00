"""dsv3c diff --numeric: per-layer errors and the first jump, on graphs that run; a clear skip otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from dsv3c.graph.diff import diff_paths
from dsv3c.graph.diff_types import GraphDiff
from dsv3c.graph.index import GraphIndex
from dsv3c.graph.load import load_graph
from dsv3c.graph.numeric import make_inputs
from dsv3c.graph.synthetic import Topology, build_model, inline_custom, quantize_fp8
from onnx import numpy_helper as nh


def _numeric(tmp_path: Path, a: onnx.ModelProto, b: onnx.ModelProto) -> GraphDiff:
    onnx.save(a, tmp_path / "a.onnx")
    onnx.save(b, tmp_path / "b.onnx")
    return diff_paths(tmp_path / "a.onnx", tmp_path / "b.onnx", numeric=True, seed=3).graphs[0]


@pytest.fixture(scope="module")
def base() -> onnx.ModelProto:
    return build_model(Topology(layers=3))


def test_inputs_are_seeded_and_valid(tmp_path: Path, base: onnx.ModelProto) -> None:
    onnx.save(base, tmp_path / "a.onnx")
    g = load_graph(tmp_path / "a.onnx")
    feeds = make_inputs([(g, GraphIndex(g.graph))], seed=3)
    assert (feeds["positions"] == np.arange(4)).all()
    assert feeds["input_ids"].dtype == np.int64 and feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < 64
    again = make_inputs([(g, GraphIndex(g.graph))], seed=3)
    assert all((feeds[k] == again[k]).all() for k in feeds)


def test_lowering_is_exact(tmp_path: Path, base: onnx.ModelProto) -> None:
    n = _numeric(tmp_path, base, inline_custom(base)).numeric
    assert n is not None and n.status == "ok", n
    assert n.compared >= len(base.graph.node) and n.first_jump is None
    assert all(e.max_rel == 0 for e in n.layers) and n.outputs[0].tensor == "logits"


def test_quantized_errors_per_layer_and_first_jump(tmp_path: Path, base: onnx.ModelProto) -> None:
    n = _numeric(tmp_path, base, quantize_fp8(base)).numeric
    assert n is not None and n.status == "ok", n
    assert [e.layer for e in n.layers] == [0, 1, 2, None]
    assert all(1e-3 < e.max_rel < 0.3 for e in n.layers)  # fp8 e4m3 with 128-blocks: percent-level
    assert n.first_jump is not None
    assert n.first_jump.node == "/model/layers.0/self_attn/q_a_proj/MatMul"  # the first quantized linear
    assert 1e-3 < n.outputs[0].max_rel < 0.2


def test_first_jump_finds_a_broken_weight(tmp_path: Path, base: onnx.ModelProto) -> None:
    b = onnx.ModelProto()
    b.CopyFrom(base)
    name = "model.layers.1.mlp.shared_experts.up_proj.weight"
    t = next(t for t in b.graph.initializer if t.name == name)
    t.CopyFrom(nh.from_array(nh.to_array(t) * 3.0, name))
    n = _numeric(tmp_path, base, b).numeric
    assert n is not None and n.status == "ok"
    assert n.first_jump is not None and n.first_jump.node == "/model/layers.1/mlp/shared_experts/up_proj/MatMul"
    assert n.first_jump.max_rel == pytest.approx(2.0, rel=1e-4)
    assert n.layers[0].layer == 0 and n.layers[0].max_rel == 0.0


def test_skipped_without_weights(tmp_path: Path) -> None:
    a = build_model(Topology(layers=1, data=False))
    g = _numeric(tmp_path, a, quantize_fp8(a))
    assert g.numeric is not None and g.numeric.status == "skipped"
    assert "no data for" in g.numeric.reason and "--weights none" in g.numeric.reason
    assert g.rewrites  # the structural diff still ran


def test_skipped_when_a_graph_cannot_run(tmp_path: Path, base: onnx.ModelProto) -> None:
    b = onnx.ModelProto()
    b.CopyFrom(base)
    del b.functions[:]  # custom nodes without a body: onnxruntime has no kernel for them
    g = _numeric(tmp_path, base, b)
    assert g.numeric is not None and g.numeric.status == "skipped" and g.numeric.reason.startswith("cannot run b.onnx")
