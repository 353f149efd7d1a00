"""The artifact package alone: weight layout round trips (fp8 as-is), manifests, atomic writes and their rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from dsv3c.artifact import atomic
from dsv3c.artifact.atomic import atomic_file, atomic_folder, check_disjoint, remove_stale_temporaries, write_text
from dsv3c.artifact.weights import ALIGN, WeightsWriter, plan_layout, read_slot, read_slots
from dsv3c.errors import CheckpointError, UserError


def test_layout_aligns_each_slot_and_shares_names() -> None:
    layout = plan_layout(
        [
            ("a", ir.DataType.FLOAT, (3, 5)),
            ("b", ir.DataType.FLOAT8E4M3FN, (256, 256)),
            ("a", ir.DataType.FLOAT, (3, 5)),  # a second graph naming the same weight
            ("b.scale", onnx.TensorProto.FLOAT, (2, 2)),
        ]
    )
    assert [s.offset for s in layout.slots.values()] == [0, ALIGN, ALIGN + 256 * 256]
    assert layout.slots["b"].nbytes == 256 * 256  # one byte per fp8 value
    assert layout.total == ALIGN + 256 * 256 + 16
    with pytest.raises(RuntimeError, match="differs"):
        layout.add("a", ir.DataType.BFLOAT16, (3, 5))


def test_fp8_and_bf16_bytes_are_written_as_they_are_and_read_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fp8 = rng.normal(size=(4, 128, 64)).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.uniform(size=(1, 1)).astype(np.float32)
    bf16 = rng.normal(size=(7,)).astype(ml_dtypes.bfloat16)
    layout = plan_layout(
        [("w", ir.DataType.FLOAT8E4M3FN, fp8.shape), ("w.scale", ir.DataType.FLOAT, (1, 1)), ("n", 16, (7,))]
    )
    with WeightsWriter(tmp_path / "weights.bin", layout) as w:
        for e in range(4):  # stacked experts, one at a time, out of order
            w.write("w", fp8[3 - e], index=3 - e)
        w.write("w.scale", scale)
        assert w.missing() == ["n"]
        w.write("n", bf16.tobytes())
        assert w.missing() == []
    protos = []
    for names in (["w", "w.scale"], ["n", "w"]):
        graph = onnx.helper.make_graph([], "g", [], [], initializer=[layout.external_proto(n) for n in names])
        protos.append(onnx.helper.make_model(graph))
    location, slots = read_slots(tmp_path, protos)
    assert location == "weights.bin" and [s.name for s in slots] == ["w", "w.scale", "n"]
    got = {s.name: read_slot(tmp_path / location, s) for s in slots}
    assert got["w"].dtype == ml_dtypes.float8_e4m3fn and got["w"].tobytes() == fp8.tobytes()
    assert got["w.scale"].tobytes() == scale.tobytes() and got["n"].tobytes() == bf16.tobytes()
    tensor = layout.external_tensor("w", tmp_path)
    assert tensor.numpy().tobytes() == fp8.tobytes()  # onnx_ir reads the same slot


def test_writer_refuses_wrong_shapes_and_sizes(tmp_path: Path) -> None:
    layout = plan_layout([("w", ir.DataType.FLOAT, (2, 3))])
    with WeightsWriter(tmp_path / "weights.bin", layout) as w:
        with pytest.raises(CheckpointError, match="shape"):
            w.write("w", np.zeros((3, 2), np.float32))
        with pytest.raises(CheckpointError, match="bytes"):
            w.write("w", b"\0" * 5)
        with pytest.raises(CheckpointError, match="outside"):
            w.write("w", np.zeros(3, np.float32), index=2)


def test_reader_refuses_locations_outside_the_folder(tmp_path: Path) -> None:
    t = plan_layout([("w", ir.DataType.FLOAT, (2,))]).external_proto("w", location="../evil.bin")
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], initializer=[t]))
    with pytest.raises(UserError, match="escapes"):
        read_slots(tmp_path, [model])


def test_check_disjoint_refuses_same_inside_and_containing(tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for out, how in (("in", "is"), ("in/sub", "lies inside"), (".", "contains"), ("in/../in", "is")):
        with pytest.raises(UserError, match=how):
            check_disjoint(tmp_path / out, [tmp_path / "in"])
    check_disjoint(tmp_path / "other", [tmp_path / "in", None])


def test_atomic_folder_replaces_only_dsv3c_folders(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    for force in (False, True):
        with pytest.raises(UserError, match="--force" if not force else "did not write"), atomic_folder(user, force):
            pass
    assert (user / "notes.txt").read_text() == "precious"
    ours = tmp_path / "ours"
    with atomic_folder(ours) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"format_version": 1, "dsv3c_version": "0"}))
    with atomic_folder(ours, force=True) as tmp:
        (tmp / "x").write_text("new")
    assert sorted(p.name for p in ours.iterdir()) == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "user"]  # no temporaries left


def test_a_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path: Path) -> None:
    target = tmp_path / "report.txt"
    write_text(target, "old")
    with pytest.raises(ValueError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise ValueError("boom")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.txt"]
    with pytest.raises(UserError, match="is a folder"), atomic_file(tmp_path):
        pass
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_temporaries_of_dead_runs_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.{dead_pid}.abc.partial"
    stale.mkdir()
    (stale / "weights.bin").write_bytes(b"x")
    live = tmp_path / f".out.{os.getppid()}.abc.partial"
    live.mkdir()
    other = tmp_path / f".other.{dead_pid}.abc.partial"
    other.mkdir()
    assert remove_stale_temporaries(tmp_path / "out") == [stale]
    assert live.exists() and other.exists()
    with atomic_folder(tmp_path / "other") as tmp:
        (tmp / "f").write_text("")
    assert not other.exists()


def test_the_commit_rename_holds_signals(tmp_path: Path) -> None:
    import signal

    seen = []
    old = signal.signal(signal.SIGTERM, lambda *_: seen.append(atomic.Path(tmp_path / "out").exists()))
    try:
        with atomic._signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == []  # held while renaming
            (tmp_path / "out").mkdir()
        assert seen == [True]  # delivered right after
    finally:
        signal.signal(signal.SIGTERM, old)


def _v1_manifest(folder: Path) -> dict[str, object]:
    """A manifest.json as the first dsv3c release wrote it (format_version 1), with its graph files."""
    for role in ("prefill", "decode"):
        (folder / f"{role}.onnx").write_bytes(b"")
    (folder / "weights.bin").write_bytes(b"")
    sig = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}], "outputs": []}
    return {
        "format_version": 1,
        "dsv3c_version": "0.1.0",
        "config": {"num_hidden_layers": 2},
        "weights": "none",
        "weights_file": "weights.bin",
        "dtype": "float32",
        "opset": 21,
        "graphs": {"prefill": "prefill.onnx", "decode": "decode.onnx", "mtp": None},
        "signatures": {"prefill": sig, "decode": sig},
        "cache": {
            "layers": 2,
            "mtp_layers": 0,
            "ckv_width": 4,
            "kpe_width": 2,
            "dtype": "float32",
            "width": 6,
            "append_rule": "rule",
        },
        "stages": [{"stage": "export"}],
    }


def test_version_1_manifests_read_and_round_trip_and_unknown_versions_are_one_line(tmp_path: Path) -> None:
    from dsv3c.artifact.manifest import ManifestError, is_export_folder, read_manifest, write_manifest

    raw = _v1_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    m = read_manifest(tmp_path)
    assert m.cache.width == 6 and m.stage("export") == {"stage": "export"} and is_export_folder(tmp_path)
    write_manifest(m, tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text()) == raw
    (tmp_path / "manifest.json").write_text(json.dumps({**raw, "format_version": 2}))
    with pytest.raises(ManifestError, match="format_version 2"):
        read_manifest(tmp_path)


def test_engine_manifest_round_trips(tmp_path: Path) -> None:
    from dsv3c.artifact.engine_manifest import (
        EngineManifest,
        EngineRecord,
        LayerSummary,
        ShapeRange,
        TensorRecord,
        read_engine_manifest,
        write_engine_manifest,
    )

    record = EngineRecord(
        "decode",
        "decode.engine",
        10,
        "ab",
        0.5,
        [TensorRecord("x", "float32", ["batch", 4])],
        [],
        [{"x": ShapeRange([1, 4], [2, 4], [8, 4])}],
        LayerSummary(total=3, by_type={"MATMUL": 3}),
        ["8.9"],
    )
    manifest = EngineManifest(
        {"name": "tensorrt_rtx", "version": "1.7.1"}, "fp32", ["8.9"], {}, {}, {}, {"decode": record}
    )
    write_engine_manifest(manifest, tmp_path)
    assert read_engine_manifest(tmp_path) == manifest
