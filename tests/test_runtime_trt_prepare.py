"""What `dsv3c build` hands TensorRT's parser (runtime/trt/prepare.py), checked without TensorRT.

The minimal preparation inlines every model-local function through onnxkit's inliner: the inlined graph
must compute what the export computes, keep no custom node, and name each inlined node after its call site
and its place in the body (`layers.0/node_mla_attention/Shape_0`), which build errors and engine layer
names rely on. The checks name the node TensorRT could not take.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from dsv3c.artifact.manifest import read_manifest
from dsv3c.errors import UserError
from dsv3c.onnxkit.session import SessionSetup, open_session
from dsv3c.runtime.trt.prepare import load_for_parser, online_scale_node

from .fixtures.exports import without_function_bodies
from .fixtures.pipeline import PipelineFolders


@pytest.fixture(scope="module")
def folders(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> PipelineFolders:
    return PipelineFolders(tiny_export, tmp_path_factory.mktemp("prepare"))


def _feeds(folder: Path, role: str) -> dict[str, np.ndarray]:
    """Seeded inputs from the manifest's signature: batch 1, 2 new tokens after a past of 3."""
    manifest = read_manifest(folder)
    sizes = {"batch": 1, "q": 2, "seq": 2, "past": 3}
    rng = np.random.default_rng(7)
    feeds = {}
    for t in manifest.signatures[role].inputs:
        shape = [d if isinstance(d, int) else sizes[d] for d in t.shape]
        if t.name == "positions":
            feeds[t.name] = np.broadcast_to(3 + np.arange(shape[-1]), shape).astype(np.int64)
        elif t.dtype == "int64":
            feeds[t.name] = rng.integers(0, 64, size=shape).astype(np.int64)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("role", ["decode", "mtp"])
def test_inlined_graph_computes_what_the_export_computes(tiny_export: Path, role: str) -> None:
    graph = load_for_parser(read_manifest(tiny_export), role)
    model = onnx.load_from_string(graph.model_bytes)
    assert not model.functions
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    original = onnx.load(str(graph.path), load_external_data=False)
    external = {t.name for t in original.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external and external == {  # the weights stay in weights.bin, referenced, not read
        t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    }
    feeds = _feeds(tiny_export, role)
    setup = SessionSetup(optimization="none", weights_folder=tiny_export)
    expected = open_session(graph.path, setup).run(None, feeds)
    got = open_session(graph.model_bytes, setup).run(None, feeds)
    assert len(got) == len(expected)
    for x, y in zip(got, expected, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_inlined_nodes_are_named_after_call_site_and_body_place(tiny_export: Path) -> None:
    path = read_manifest(tiny_export).graph_path("decode")
    model = ir.load(path)
    calls = [n for n in model.graph if n.op_identifier() in model.functions]
    assert calls
    graph = load_for_parser(read_manifest(tiny_export), "decode")
    names = [ref.name for ref in graph.nodes]
    assert len(set(names)) == len(names)
    assert [ref.index for ref in graph.nodes] == list(range(len(names)))
    for call in calls:
        body = model.functions[call.op_identifier()]
        expected = [f"{call.name}/{n.name or f'{n.op_type}_{k}'}" for k, n in enumerate(body)]
        assert [n for n in names if n.startswith(f"{call.name}/")] == expected
    first = calls[0]
    body = model.functions[first.op_identifier()]
    ref = graph.nodes[names.index(f"{first.name}/{next(iter(body)).op_type}_0")]
    assert ref.op_type == next(iter(body)).op_type
    kept = {n.name for n in model.graph if n not in calls}
    assert kept <= set(names)  # the main graph's own nodes keep their names


def test_online_scales_are_named_and_refused(folders: PipelineFolders) -> None:
    manifest = read_manifest(folders["quantized"])
    where = online_scale_node(manifest)
    assert where is not None and where.startswith("prefill.onnx: node '") and "/input/quantize" in where
    with pytest.raises(UserError, match=r"node \d+ '.*/input/quantize' \(QuantizeLinear\) has a scale computed"):
        load_for_parser(manifest, "decode")


def test_trt_lowering_needs_no_inlining(folders: PipelineFolders) -> None:
    manifest = read_manifest(folders["trt"])
    assert online_scale_node(manifest) is None
    graph = load_for_parser(manifest, "decode")
    model = ir.load(graph.path)
    assert [ref.name for ref in graph.nodes] == [n.name or f"#{i}" for i, n in enumerate(model.graph)]
    assert graph.has_fp8 is False and not graph.blocked_dq and not graph.mxfp8


def test_custom_node_without_body_is_named(tiny_export: Path, tmp_path: Path) -> None:
    without_function_bodies(tiny_export, tmp_path / "exp")
    with pytest.raises(UserError, match=r"node \d+ 'layers\.0/node_mla_attention' \(dsv3c::MLAAttention\).*plugins"):
        load_for_parser(read_manifest(tmp_path / "exp"), "decode")


def test_fp8_cast_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_export, tmp_path / "exp")
    path = tmp_path / "exp" / "decode.onnx"
    model = onnx.load(str(path), load_external_data=False)
    first = model.graph.node[0]
    cast = onnx.helper.make_node(
        "Cast", [first.output[0]], ["to_fp8"], name="fp8_cast", to=onnx.TensorProto.FLOAT8E4M3FN
    )
    model.graph.node.insert(1, cast)
    onnx.save(model, str(path))
    with pytest.raises(UserError, match=r"node 1 'fp8_cast' \(Cast\) casts to fp8"):
        load_for_parser(read_manifest(tmp_path / "exp"), "decode")


def test_unreadable_graph_is_one_line(tiny_export: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_export, tmp_path / "exp")
    (tmp_path / "exp" / "decode.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(UserError, match=r"decode\.onnx: not a readable ONNX file"):
        load_for_parser(read_manifest(tmp_path / "exp"), "decode")
