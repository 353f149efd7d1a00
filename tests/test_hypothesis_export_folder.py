"""Export folders, generated: hostile manifest.json files and ONNX external data (locations escaping the
folder, symlinks out of it, offsets and lengths past the end, truncated weights). Reading the folder the
way quantize, lower and generate do either works or raises one UserError, never another exception; and
the commands themselves answer with one line and exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnx
import pytest
from dsv3c.artifact.export_folder import check_external_data, read_export
from dsv3c.errors import UserError
from dsv3c.export.exporter import export
from dsv3c.export.source import from_config
from dsv3c.models.config import DeepseekV3Config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer export with random weights (prefill and decode)."""
    d = DeepseekV3Config.from_preset("tiny").to_dict()
    d.update(num_hidden_layers=1, first_k_dense_replace=1, num_nextn_predict_layers=0)
    out = tmp_path_factory.mktemp("good") / "export"
    export(from_config(DeepseekV3Config.from_dict(d), "one-layer"), out, weights="random")
    return out


def _read(folder: Path) -> None:
    """What quantize and lower read before any pass (graphs, weights' locations and sizes), then the bytes."""
    try:
        graphs = read_export(folder)
        for model in graphs.models.values():
            for value in model.graph.initializers.values():
                if value.const_value is not None:
                    value.const_value.tobytes()
        for role in graphs.models:
            check_external_data(graphs.manifest.graph_path(role))
    except UserError as e:
        assert "\n" not in str(e)


def _copy(good: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="dsv3c-hyp-"))
    for f in good.iterdir():
        (tmp / f.name).symlink_to(f) if f.name == "weights.bin" else shutil.copy(f, tmp / f.name)
    return tmp


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def manifest_edits(draw: st.DrawFn, raw: dict[str, Any]) -> Any:
    edited = json.loads(json.dumps(raw))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(edited)))
        value = draw(
            json_values
            | st.sampled_from(["../x.onnx", "/etc/passwd", "prefill.onnx", "decode.onnx", "", "none", 2**70, -1])
            | st.sampled_from(["a" * 300, "a" * 300 + ".onnx"])  # a file name no file system holds
        )
        _set(edited, path, value, draw(st.booleans()))
    return edited


def _paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(d, dict):
        for k, v in list(d.items())[:40]:
            out += _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d[:3]):
            out += _paths(v, (*prefix, i))
    return out


def _set(d: Any, path: tuple[Any, ...], value: Any, delete: bool) -> None:
    for key in path[:-1]:
        d = d[key]
    if delete and isinstance(d, dict):
        d.pop(path[-1], None)
    else:
        d[path[-1]] = value


@SETTINGS
@given(data=st.data())
def test_edited_manifests(good: Path, data: st.DataObject) -> None:
    raw = json.loads((good / "manifest.json").read_text())
    folder = _copy(good)
    try:
        (folder / "manifest.json").write_text(json.dumps(data.draw(manifest_edits(raw))))
        _read(folder)
    finally:
        shutil.rmtree(folder)


# JSON nested deeper than Python's parser recurses
deep_json = st.integers(1_000, 100_000).flatmap(lambda n: st.sampled_from(["[" * n, '{"a":' * n, "[" * n + "]" * n]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=80) | st.text(max_size=80).map(str.encode) | deep_json.map(str.encode))
def test_manifest_bytes(good: Path, blob: bytes) -> None:
    folder = _copy(good)
    try:
        (folder / "manifest.json").write_bytes(blob)
        _read(folder)
    finally:
        shutil.rmtree(folder)


locations = st.sampled_from(
    [
        "weights.bin",
        "../weights.bin",
        "/etc/hostname",
        "outside-link.bin",
        "missing.bin",
        "",
        "sub/../weights.bin",
        "C:\\weights.bin",
        "./weights.bin",
        "weights.bin\x00",
        "a" * 300,
    ]
) | st.text(max_size=12)
numbers = st.integers(min_value=-5, max_value=2**64) | st.sampled_from(["x", "", "1e3", " 4"])


@SETTINGS
@given(data=st.data())
def test_edited_external_data(good: Path, data: st.DataObject) -> None:
    folder = _copy(good)
    try:
        (folder / "outside-link.bin").symlink_to("/etc/hostname")
        path = folder / data.draw(st.sampled_from(["prefill.onnx", "decode.onnx"]))
        proto = onnx.load(path, load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        for _ in range(data.draw(st.integers(1, 3))):
            t = external[data.draw(st.integers(0, len(external) - 1))]
            key = data.draw(st.sampled_from(["location", "offset", "length"]))
            value = data.draw(locations if key == "location" else numbers.map(str))
            entries = {e.key: e for e in t.external_data}
            if key in entries:
                entries[key].value = value
            else:
                entry = t.external_data.add()
                entry.key, entry.value = key, value
        onnx.save(proto, path)
        if data.draw(st.booleans()):  # and sometimes the weights file cut short
            target = (good / "weights.bin").read_bytes()
            (folder / "weights.bin").unlink()
            (folder / "weights.bin").write_bytes(target[: data.draw(st.integers(0, len(target)))])
        _read(folder)
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("command", ["quantize", "lower", "generate", "inspect"])
def test_commands_answer_escaping_data_with_one_line(good: Path, tmp_path: Path, command: str) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(good, folder)
    path = folder / "prefill.onnx"
    proto = onnx.load(path, load_external_data=False)
    t = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in t.external_data if e.key == "location").value = f"../{good.name}/weights.bin"
    onnx.save(proto, path)
    args = {
        "quantize": ["--out", str(tmp_path / "q")],
        "lower": ["--target", "ort", "--out", str(tmp_path / "l")],
        "generate": ["--runtime", "ort", "--prompt-ids", "1,2"],
        "inspect": [],
    }[command]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "dsv3c", command, str(folder), *args], capture_output=True, text=True, env=env
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if command == "inspect" and result.returncode == 0:
        return  # inspect reads structure only, never the weights' bytes
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "escapes" in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "location,expected", [("a" * 300, "is not a usable file name"), ("weights\x00.bin", "which is missing")]
)
def test_an_impossible_file_name_is_one_line(good: Path, location: str, expected: str) -> None:
    """Found by test_edited_external_data in CI: a 300-character location made os.stat raise OSError."""
    folder = _copy(good)
    try:
        path = folder / "prefill.onnx"
        proto = onnx.load(path, load_external_data=False)
        t = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        next(e for e in t.external_data if e.key == "location").value = location
        onnx.save(proto, path)
        with pytest.raises(UserError, match=expected) as e:
            read_export(folder)
        assert "\n" not in str(e.value)
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize(
    "edit",
    [
        {"graphs": {"prefill": "a" * 300}},  # was OSError (ENAMETOOLONG) from Path.is_file
        {"weights_file": "a" * 300},
        "[" * 50_000,  # was RecursionError
    ],
    ids=["graph-name-too-long", "weights-name-too-long", "nested-too-deep"],
)
def test_a_manifest_no_one_could_read_is_one_line(good: Path, edit: dict[str, Any] | str) -> None:
    """Found by probing the manifest with what the generated tests did not draw (found before the draws did)."""
    folder = _copy(good)
    try:
        raw = json.loads((good / "manifest.json").read_text())
        if isinstance(edit, dict):
            for key, value in edit.items():
                raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
        (folder / "manifest.json").write_text(edit if isinstance(edit, str) else json.dumps(raw))
        with pytest.raises(UserError, match=r"missing|nested too deep") as e:
            read_export(folder)
        assert "\n" not in str(e.value)
    finally:
        shutil.rmtree(folder)
