"""The trained-model view of quantize --report and diff --numeric: per-layer error (growth) and the loss delta
on real text, as text, JSON and HTML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dsv3c.cli.main import main
from dsv3c.eval.metrics import Comparison, EvalResult
from dsv3c.eval.report_view import ReportView, render_html, render_json, render_text
from dsv3c.passes.report import ErrorRow, QuantReport

from .test_eval import REPO
from .test_eval_calibration import export_with_tokenizer  # noqa: F401  (a fixture)


def _view() -> ReportView:
    rows = [
        ErrorRow("prefill", "layers.0", {"a": 1e-3, "b": 0.0}, {"a": 5e-4, "b": 0.0}),
        ErrorRow("prefill", "layers.1", {"a": 4e-3, "b": 2e-3}, {"a": 1e-3, "b": 1e-3}),
        ErrorRow("prefill", "logits", {"a": 8e-3, "b": 3e-3}, {"a": 2e-3, "b": 1e-3}),
    ]
    losses = {
        "a": EvalResult("a", "ort", 2.02, 7.5, 100, 4, 26, Comparison("ref", 2.0, 0.01, 0.97, 1e-3, 5e-2)),
        "b": EvalResult("b", "ort", 2.001, 7.4, 100, 4, 26, Comparison("ref", 2.0, 5e-4, 0.99, 1e-4, 1e-2)),
    }
    return ReportView(QuantReport(["a", "b"], rows), "text", losses)


def test_growth_is_each_layer_over_the_one_before() -> None:
    growth = _view().growth()
    assert growth == {("prefill", "layers.1"): {"a": pytest.approx(4.0), "b": float("inf")}}
    data = json.loads(render_json(_view()))
    assert data["rows"][1]["growth"] == {"a": pytest.approx(4.0), "b": None}  # inf is not JSON
    assert data["rows"][0]["growth"] is None and data["loss"]["a"]["rel_loss_error"] == 0.01
    assert "relative +1.000e-02" in render_text(_view()) and "top-1 agreement 97.00%" in render_text(_view())
    html = render_html(_view())
    assert html.count("<polyline") == 2 and "4.00x" in html and "<tr class='up'>" in html


def test_cli_writes_the_text_view_as_json_and_html(
    export_with_tokenizer: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = tmp_path / "text.txt"
    text.write_text((REPO / "README.md").read_text())
    out, report = tmp_path / "fp8", tmp_path / "report.json"
    argv = ["quantize", str(export_with_tokenizer), "--out", str(out), "--report", "--report-data", str(text)]
    assert main([*argv, "--report-format", "json", "--report-out", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["inputs"] == "text" and data["schemes"] == ["block fp8", "per-tensor fp8"]
    assert "--report-out" in data["command"] and data["commit"] and data["machine"]["cpus"]
    assert {r["graph"] for r in data["rows"]} == {"prefill", "decode", "mtp", "all"}
    layers = [r for r in data["rows"] if r["graph"] == "prefill" and r["tensor"].startswith("layers.")]
    assert len(layers) >= 2 and all(r["growth"] is not None for r in layers[1:])
    assert all(0 < r["error"]["block fp8"] < 1 for r in layers)
    loss = data["loss"]["block fp8"]
    assert loss["tokens"] > 0 and abs(loss["rel_loss_error"]) < 0.5 and 0 < loss["top1_agreement"] <= 1
    capsys.readouterr()
    # dsv3c diff --numeric --data: the same text through both folders, per-layer errors and the loss delta
    html = tmp_path / "diff.html"
    diff = ["diff", str(export_with_tokenizer), str(out), "--numeric", "--data", str(text)]
    assert main([*diff, "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"] == f"text: {text}" and report["loss"]["tokens"] == loss["tokens"]
    assert report["loss"]["rel_loss_error"] == pytest.approx(loss["rel_loss_error"], rel=1e-6)  # eval's measure
    prefill = next(g for g in report["graphs"] if g["role"] == "prefill")["numeric"]
    assert prefill["status"] == "ok" and prefill["inputs"]["input_ids"] == [4, 64] and prefill["layers"]
    assert main([*diff, "--format", "html", "--out", str(html)]) == 1
    assert 'id="loss"' in html.read_text() and "relative" in html.read_text()
    capsys.readouterr()
    assert main(["diff", str(export_with_tokenizer), str(out), "--data", str(text)]) == 2
    assert "pass --numeric too" in capsys.readouterr().err
    # the output may not overlap an input, and the option needs --report
    assert main([*argv, "--force", "--report-out", str(export_with_tokenizer / "r.html")]) == 2
    assert "the output lies inside the input" in capsys.readouterr().err
    assert not (export_with_tokenizer / "r.html").exists()
    assert main(["quantize", str(export_with_tokenizer), "--out", str(tmp_path / "x"), "--report-format", "html"]) == 2
    assert "pass --report too" in capsys.readouterr().err
