"""quantize --calibrate N --calibration-data TEXT: batches from text, fed to each graph as in generation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from dsv3c.artifact.export_folder import read_export
from dsv3c.cli.main import main
from dsv3c.onnxkit.linears import LinearKind, rewritable_linears
from dsv3c.passes.calibrate import calibrate, calibration_record, text_feeds
from dsv3c.passes.ort_run import GraphRunner

from .test_eval import REPO, train_tokenizer


@pytest.fixture(scope="module")
def export_with_tokenizer(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("calibration") / "export"
    shutil.copytree(tiny_export, folder)
    train_tokenizer((REPO / "README.md").read_text(), 512, folder / "tokenizer.json")
    return folder


def windows(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 512, size=(2, 12), dtype=np.int64) for _ in range(2)]


def test_decode_feed_continues_the_prefill(tiny_export: Path) -> None:
    """The decode graph, fed the prefill's cache, gives the logits prefill gives for the whole window."""
    graphs = read_export(tiny_export)
    ids = windows(0)[0]
    prefill = GraphRunner(graphs.models["prefill"], tiny_export)
    head = prefill.run(text_feeds(graphs.manifest, "prefill", ids, {}))
    decode = GraphRunner(graphs.models["decode"], tiny_export).run(text_feeds(graphs.manifest, "decode", ids, head))
    whole = prefill.run({"input_ids": ids, "positions": np.tile(np.arange(12, dtype=np.int64), (2, 1))})
    np.testing.assert_allclose(decode["logits"][:, 0], whole["logits"][:, -1], rtol=1e-4, atol=1e-4)
    mtp = GraphRunner(graphs.models["mtp"], tiny_export).run(text_feeds(graphs.manifest, "mtp", ids, head))
    assert mtp["logits"].shape == (2, 11, 512)


def test_text_calibration_covers_the_same_linears(tiny_export: Path) -> None:
    graphs = read_export(tiny_export)
    linears = {
        lin.name for m in graphs.models.values() for lin in rewritable_linears(m.graph) if lin.kind == LinearKind.MATMUL
    }
    from_text = calibrate(graphs, linears, 2, text=windows(1))
    assert from_text == calibrate(graphs, linears, 2, text=windows(1))  # deterministic
    from_random = calibrate(graphs, linears, 2, seed=0)
    assert set(from_text) == set(from_random) and len(from_text) > 10
    assert all(v > 0 for v in from_text.values())
    assert from_text != from_random


def test_cli_records_the_source(
    export_with_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "text.txt"
    data.write_text((REPO / "README.md").read_text())
    out = tmp_path / "q"
    args = ["quantize", str(export_with_tokenizer), "--out", str(out), "--calibrate", "2"]
    assert main([*args, "--calibration-data", str(data)]) == 0
    assert "(text)" in capsys.readouterr().out
    record = json.loads((out / "manifest.json").read_text())["stages"][-1]["calibration"]
    assert record["source"] == "text" and record["batches"] == 2 and record["tokens"] == 2 * 4 * 64
    assert calibration_record(2, 7, None) == {"source": "random ids", "batches": 2, "seed": 7}  # the fallback
    fresh = str(tmp_path / "fresh")
    assert main(["quantize", str(export_with_tokenizer), "--out", fresh, "--calibration-data", str(data)]) == 2
    assert "pass --calibrate too" in capsys.readouterr().err
    assert main([*args, "--force", "--calibration-data", str(tmp_path / "none")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_report_on_text(tiny_export: Path, export_with_tokenizer: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """quantize --report's per-layer measure runs every graph on text; a graph against itself has no error."""
    from dsv3c.passes.report import compare_exports

    report = compare_exports(tiny_export, {"same": tiny_export}, text=windows(2))
    assert {r.graph for r in report.rows} == {"prefill", "decode", "mtp", "all"}
    assert all(r.errors["same"] == 0.0 for r in report.rows)
    args = ["quantize", str(export_with_tokenizer), "--out", str(tiny_export.parent / "unused"), "--report-data", "x"]
    assert main(args) == 2
    assert "pass --report too" in capsys.readouterr().err
