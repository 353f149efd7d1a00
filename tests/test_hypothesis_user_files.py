"""The other files a user's folders hold, generated: generation_config.json (EOS ids), partition.json,
engine_manifest.json, and a manifest.json that --force reads to tell dsv3c's folders from the user's. Any
bytes give a result or one UserError, never another exception."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dsv3c.artifact.atomic import check_output
from dsv3c.artifact.engine_manifest import ENGINE_MANIFEST, read_engine_manifest
from dsv3c.errors import UserError
from dsv3c.parallel.partition import PARTITION_FILE, read_partition
from dsv3c.runtime.loading import eos_ids, related_folders
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# JSON nested deeper than Python's parser recurses
deep_json = st.integers(1_000, 100_000).flatmap(lambda n: st.sampled_from(["[" * n, '{"a":' * n, "[" * n + "]" * n]))
contents = (
    st.binary(max_size=40)
    | deep_json.map(str.encode)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries({"eos_token_id": json_values}).map(lambda v: json.dumps(v).encode())
    | st.sampled_from([b'{"eos_token_id": 1e999}', b'{"eos_token_id": NaN}', b'{"eos_token_id": [1, true]}'])
)


def _eos(folder: Path) -> None:
    ids = eos_ids(folder)
    assert isinstance(ids, list) and all(type(i) is int for i in ids)


def _refuse_force(folder: Path) -> None:
    (folder / "keep.txt").write_text("the user's")  # with a manifest no one could read: the user's folder
    check_output(folder, force=True)  # reaching here means --force would replace it: a UserError is expected


READERS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    "generation_config": ("generation_config.json", _eos),
    "partition": (PARTITION_FILE, read_partition),
    "engine_manifest": (ENGINE_MANIFEST, read_engine_manifest),
    "force": ("manifest.json", _refuse_force),
}


def _read(reader: str, data: bytes) -> str | None:
    """The UserError's message, or None when the file was read."""
    name, read = READERS[reader]
    with tempfile.TemporaryDirectory(prefix="dsv3c-hyp-") as tmp:
        (Path(tmp) / name).write_bytes(data)
        try:
            read(Path(tmp))
        except UserError as e:
            assert "\n" not in str(e)
            return str(e)
    return None


@settings(max_examples=300, deadline=None)
@given(reader=st.sampled_from(sorted(READERS)), data=contents)
def test_any_bytes_give_a_result_or_one_user_error(reader: str, data: bytes) -> None:
    message = _read(reader, data)
    if reader == "force":
        assert message is not None and "dsv3c did not write" in message


# ---- regression tests: each failed before its fix ----------------------------------------------------------


@pytest.mark.parametrize(
    ("reader", "data", "expected"),
    [
        ("generation_config", b"\xff\xfe{", "not a valid generation config"),  # was UnicodeDecodeError
        ("generation_config", b"[" * 50_000, "not a valid generation config"),  # was RecursionError
        ("generation_config", b'{"eos_token_id": 1e999}', "eos_token_id must be"),  # was TypeError
        ("generation_config", b'{"eos_token_id": "2"}', "eos_token_id must be"),  # was silently no EOS
        ("partition", b"[" * 50_000, "not a readable partition manifest"),  # was RecursionError
        ("engine_manifest", b"[" * 50_000, "cannot read"),  # was RecursionError
        ("force", b"[" * 50_000, "dsv3c did not write"),  # was RecursionError from --force's check
    ],
)
def test_files_no_one_could_read_are_one_line(reader: str, data: bytes, expected: str) -> None:
    """Found by probing these files with bytes (before this file, no generated test read them)."""
    message = _read(reader, data)
    assert message is not None and expected in message


def test_eos_ids_keep_their_list() -> None:
    assert _read("generation_config", b'{"eos_token_id": [1, 7]}') is None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "generation_config.json").write_text('{"eos_token_id": [1, 7]}')
        assert eos_ids(Path(tmp)) == [1, 7]


def test_an_export_source_no_file_system_holds_is_skipped(tmp_path: Path) -> None:
    """Found by probing: a manifest's recorded export source of 300 characters made Path.is_dir raise OSError
    (ENAMETOOLONG) while generate looked for the source checkpoint's tokenizer and EOS ids."""
    from dsv3c.artifact.manifest import MANIFEST_FILE

    from .fixtures.synthetic import Topology, build_model, write_export

    write_export(tmp_path, {"prefill": build_model(Topology(data=False)), "decode": build_model(Topology(data=False))})
    raw = json.loads((tmp_path / MANIFEST_FILE).read_text())
    raw["stages"] = [{"stage": "export", "source": "s" * 300}]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(raw))
    assert related_folders(tmp_path) == [tmp_path]
    assert eos_ids(tmp_path) == []


# ---- engine_manifest.json, field by field (dsv3c inspect reads it without TensorRT) -----------------------


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An engine folder as `dsv3c build` writes it, with a stand-in engine file (inspect reads only its header)."""
    from dsv3c.artifact.engine_manifest import (
        EngineManifest,
        EngineRecord,
        LayerSummary,
        ShapeRange,
        TensorRecord,
        write_engine_manifest,
    )

    folder = tmp_path_factory.mktemp("engines") / "e"
    folder.mkdir()
    (folder / "decode.engine").write_bytes(bytes(64))
    record = EngineRecord(
        role="decode",
        file="decode.engine",
        bytes=64,
        sha256="0" * 64,
        build_seconds=1.5,
        inputs=[TensorRecord("input_ids", "int64", ["batch", 1])],
        outputs=[TensorRecord("logits", "float32", ["batch", 1, 512])],
        profiles=[{"input_ids": ShapeRange([1, 1], [1, 1], [4, 1])}],
        layers=LayerSummary(total=3, by_type={"MatMul": 3}, fp8_gemms=["a"]),
        engine_cc=["12.0"],
    )
    backend = {"name": "tensorrt_rtx", "version": "1.7", "onnx_parser_version": "1"}
    source = {"folder": "x", "preparation": "dsv3c lower", "stages": []}
    write_engine_manifest(EngineManifest(backend, "fp32", ["12.0"], source, {}, {}, {"decode": record}), folder)
    return folder


def _inspect_engines(folder: Path) -> list[str]:
    """dsv3c inspect in text, JSON and with --target-cc: the first line of each error (all must be one line)."""
    import contextlib
    import io

    from dsv3c.cli import main as cli_main

    errors = []
    for extra in ([], ["--format", "json"], ["--target-cc", "12.0"]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli_main.main(["inspect", str(folder), *extra])
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        assert code == 0 or (code == 2 and len(lines) == 1), err.getvalue()
        errors += lines
    return errors


def _paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(d, dict):
        out += [p for k, v in d.items() for p in _paths(v, (*prefix, k))]
    elif isinstance(d, list):
        out += [p for i, v in enumerate(d[:3]) for p in _paths(v, (*prefix, i))]
    return out


def _has(d: dict[Any, Any] | list[Any], key: Any) -> bool:
    return key in d if isinstance(d, dict) else isinstance(key, int) and key < len(d)


def _edited(engines: Path, edits: list[tuple[tuple[Any, ...], Any]]) -> Path:
    raw = json.loads((engines / ENGINE_MANIFEST).read_text())
    for path, value in edits:  # an edit whose path an earlier edit replaced is skipped
        d = raw
        for key in path[:-1]:
            d = d[key] if isinstance(d, dict | list) and _has(d, key) else None
        if isinstance(d, dict | list) and _has(d, path[-1]):
            d[path[-1]] = value
    folder = Path(tempfile.mkdtemp(prefix="dsv3c-hyp-"))
    (folder / "decode.engine").write_bytes((engines / "decode.engine").read_bytes())
    (folder / ENGINE_MANIFEST).write_text(json.dumps(raw))
    return folder


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_edited_engine_manifests_inspect_or_are_one_line(engines: Path, data: st.DataObject) -> None:
    import shutil

    raw = json.loads((engines / ENGINE_MANIFEST).read_text())
    values = json_values | st.sampled_from(["../decode.engine", "/etc/hostname", "decode.engine", "", "n" * 300])
    edits = data.draw(st.lists(st.tuples(st.sampled_from(_paths(raw)), values), min_size=1, max_size=3))
    folder = _edited(engines, [(p, v) for p, v in edits if p])
    try:
        _inspect_engines(folder)
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("engines", "decode", "profiles", 0), []),  # was AttributeError
        (("backend",), []),  # was TypeError
        (("backend",), {}),  # was KeyError
        (("engines", "decode", "build_seconds"), "fast"),  # was ValueError from a format spec
        (("engines", "decode", "layers", "fp8_gemms"), None),  # was TypeError
        (("engines", "decode", "profiles", 0, "input_ids", "max"), []),  # was IndexError
        (("engines", "decode", "file"), "/etc/hostname"),  # read a file outside the folder
        (("engines", "decode", "file"), "n" * 300),
    ],
)
def test_an_engine_manifest_with_a_wrong_field_is_one_line(engines: Path, path: tuple[Any, ...], value: Any) -> None:
    """Found by generating edits of engine_manifest.json (before this test, none were generated)."""
    import shutil

    folder = _edited(engines, [(path, value)])
    try:
        errors = _inspect_engines(folder)
        assert errors and all("malformed" in e for e in errors), errors
    finally:
        shutil.rmtree(folder)


def test_the_engine_folder_as_written_inspects(engines: Path) -> None:
    assert _inspect_engines(engines) == []
