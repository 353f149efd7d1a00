"""dsv3c lower --dump-dir: the stage dumps appear whole when the lowering succeeds, not at all when it fails, and
never over the input or the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dsv3c.cli import main as cli_main

from .fixtures.pipeline import PipelineFolders


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = cli_main.main([str(a) for a in args])
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_dumps_appear_whole_and_force_replaces_them(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dump = tmp_path / "dump"
    code, err = cli(capsys, "lower", tiny_export, "--target", "portable", "--out", tmp_path / "out", "--dump-dir", dump)
    assert code == 0, err
    for role in ("prefill", "decode", "mtp"):
        names = sorted(p.name for p in (dump / role).iterdir())
        assert names[0] == "00-input.onnx" and len(names) > 2, names
    assert hidden(tmp_path) == []  # no temporary left beside the dump
    again = ("lower", tiny_export, "--target", "portable", "--out", tmp_path / "out2", "--dump-dir", dump)
    code, err = cli(capsys, *again)
    assert code == 2 and "already exists" in err and not (tmp_path / "out2").exists()
    (dump / "prefill" / "00-input.onnx").unlink()
    assert cli(capsys, *again, "--force")[0] == 0  # dsv3c's own dump folder: replaced whole
    assert (dump / "prefill" / "00-input.onnx").is_file()


def test_a_failing_stage_leaves_no_dump(
    tiny_export: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # dsv3c quantize's default (online activation scales), quantized once per session (tests/fixtures/pipeline.py)
    quantized = PipelineFolders(tiny_export, tmp_path_factory.getbasetemp())["quantized"]
    assert json.loads((quantized / "manifest.json").read_text())["stages"][-1]["stage"] == "quantize"
    dump, out = tmp_path / "dump", tmp_path / "trt"
    code, err = cli(capsys, "lower", quantized, "--target", "trt", "--out", out, "--dump-dir", dump)
    assert code == 2 and "static activation scales" in err  # the trt stage refuses, after earlier stages dumped
    assert not dump.exists() and not out.exists() and hidden(tmp_path) == []


def test_a_dump_overlapping_an_input_or_the_output_is_refused(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    for dump, words in ((tiny_export / "dump", "lies inside the input"), (out, "is the input"), (tmp_path, "contains")):
        code, err = cli(
            capsys, "lower", tiny_export, "--target", "portable", "--out", out, "--dump-dir", dump, "--force"
        )
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (tiny_export / "dump").exists()
