"""Opening graphs for inspect/diff: bad input is one UserError line; weights are described, never read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from dsv3c.cli import main as cli
from dsv3c.errors import UserError
from dsv3c.graph import load as load_mod
from dsv3c.graph.load import graph_paths, load_graph
from dsv3c.graph.summary import inspect_path
from onnx import TensorProto, helper

from .fixtures.synthetic import Topology, build_model, declared


def _run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(cli, "COMMANDS", [*dict.fromkeys([*cli.COMMANDS, "inspect", "diff"])])
    return cli.main(argv)


def _tiny_with(initializer: onnx.TensorProto) -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["x", initializer.name], ["y"], name="mm")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([node], "g", [x], [y], [initializer])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"", "empty"), (b"this is not a model at all\n", "text"), (None, "truncated")],
)
def test_bad_files_are_one_line_errors(tmp_path: Path, content: bytes | None, why: str) -> None:
    path = tmp_path / f"{why}.onnx"
    if content is None:
        content = build_model(Topology(layers=1)).SerializeToString()[:5000]
    path.write_bytes(content)
    with pytest.raises(UserError, match="not an ONNX model, or truncated") as e:
        load_graph(path)
    assert "\n" not in str(e.value)


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        load_graph(tmp_path / "nope.onnx")
    with pytest.raises(UserError, match="no such file or folder"):
        graph_paths(tmp_path / "nope")
    with pytest.raises(UserError, match=r"without manifest\.json"):
        graph_paths(tmp_path)


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin", "sub/../../outside.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path: Path, location: str) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_tiny_with(declared("w", TensorProto.FLOAT, (4, 4), location=location)), path)
    with pytest.raises(UserError, match="escapes the model's folder"):
        load_graph(path)


def test_external_data_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "outside.bin").write_bytes(bytes(64))
    inner = tmp_path / "model"
    inner.mkdir()
    (inner / "w.bin").symlink_to(tmp_path / "outside.bin")
    onnx.save(_tiny_with(declared("w", TensorProto.FLOAT, (4, 4), location="w.bin")), inner / "m.onnx")
    with pytest.raises(UserError, match="links outside"):
        load_graph(inner / "m.onnx")


def test_cli_bad_input_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    assert _run_cli(["inspect", str(bad)], monkeypatch) == 2
    assert _run_cli(["diff", str(bad), str(bad)], monkeypatch) == 2
    assert _run_cli(["diff", str(tmp_path / "missing.onnx"), str(bad)], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("dsv3c ") and "error:" in line for line in err)


@pytest.mark.parametrize("data_file", ["absent", "empty"])
def test_weights_none_is_described_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_file: str) -> None:
    """A --weights none export (data file absent or zero-length) inspects fine, and no data is ever read."""
    model = build_model(Topology(layers=2, data=False))
    # one v3-sized declared tensor: 7168 x 129280 float32 would be 3.5 GB if anything loaded it
    model.graph.initializer.append(declared("model.huge.weight", TensorProto.FLOAT, (7168, 129280)))
    onnx.save(model, tmp_path / "m.onnx")
    if data_file == "empty":
        (tmp_path / "weights.bin").write_bytes(b"")

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect read weight data")

    monkeypatch.setattr(load_mod, "iter_chunks", no_reading)
    g = load_graph(tmp_path / "m.onnx")
    assert g.tensors["model.huge.weight"].data == "missing"
    assert g.tensors["model.huge.weight"].nbytes == 7168 * 129280 * 4
    assert not g.has_all_data
    summary = inspect_path(tmp_path / "m.onnx").graphs[0]
    assert summary.data.startswith("partial")  # the small constants (axes, eps) stay inline
    assert [(f.location, f.size) for f in summary.external_files] == [
        ("weights.bin", None if data_file == "absent" else 0)
    ]


def test_external_data_present_is_streamed(tmp_path: Path) -> None:
    model = build_model(Topology(layers=1))
    name = "model.layers.0.self_attn.q_a_proj.weight"
    expected = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).reshape(-1)
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    g = load_graph(tmp_path / "m.onnx")
    assert g.has_all_data
    assert {t.data for t in g.tensors.values()} == {"external"}
    chunks = list(load_mod.iter_chunks(g, name, chunk=1000))
    assert len(chunks) == g.tensors[name].numel // 1000 + 1
    assert (np.concatenate(chunks) == expected).all()


def test_inspect_and_diff_never_map_external_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Graphs load as ir.Model with lazy external tensors: inspect and a structural diff never map their file."""
    import onnx_ir as ir
    from dsv3c.graph.diff import diff_paths

    model = build_model(Topology(layers=1))
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)

    def no_mapping(self: object) -> None:
        raise AssertionError("an external tensor was read")

    monkeypatch.setattr(ir.ExternalTensor, "_load", no_mapping)
    g = load_graph(tmp_path / "m.onnx")
    assert isinstance(g.model, ir.Model) and {t.data for t in g.tensors.values()} == {"external"}
    summary = inspect_path(tmp_path / "m.onnx").graphs[0]
    assert summary.data == "present" and summary.fp8.linears > 0
    report = diff_paths(tmp_path / "m.onnx", tmp_path / "m.onnx", values=False)
    assert report.graphs[0].differences == 0
