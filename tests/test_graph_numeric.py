"""dsv3c diff --numeric on hand-made graphs: seeded inputs, the first jump at a broken weight, a clear skip when
a graph cannot run. The real pipeline's numbers (fp8 errors per layer, exact lowering, weightless skip):
tests/test_graph_pipeline.py."""

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
from onnx import numpy_helper as nh

from .fixtures.synthetic import Topology, build_model


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


def test_skipped_when_a_graph_cannot_run(tmp_path: Path, base: onnx.ModelProto) -> None:
    b = onnx.ModelProto()
    b.CopyFrom(base)
    del b.functions[:]  # custom nodes without a body: onnxruntime has no kernel for them
    g = _numeric(tmp_path, base, b)
    assert g.numeric is not None and g.numeric.status == "skipped" and g.numeric.reason.startswith("cannot run b.onnx")
