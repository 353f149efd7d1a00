"""The HTML diff report: one self-contained file, collapsible per layer, a per-layer error chart; opened in
headless Chromium (Debian's `chromium` package: `apt-get install -y chromium`) to check what it shows."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
from dsv3c.graph.diff import diff_paths
from dsv3c.graph.render_html import render_html

from .fixtures.pipeline import PipelineFolders

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def folders(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> PipelineFolders:
    return PipelineFolders(tiny_export, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def report_html(folders: PipelineFolders, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML report of the real pipeline's export -> quantize (prefill), with numbers."""
    a, b = folders["export"] / "prefill.onnx", folders["quantized"] / "prefill.onnx"
    path = tmp_path_factory.mktemp("html") / "report.html"
    path.write_text(render_html(diff_paths(a, b, numeric=True)))
    return path


def test_self_contained(report_html: Path) -> None:
    html = report_html.read_text()
    assert html.startswith("<!doctype html>") and html.count("<details") == 4  # layers 0-2, outside layers
    assert "<script>" in html and "<style>" in html and html.count('<rect class="bar') == 4
    # nothing to fetch: no links, sources or URLs other than the SVG namespace
    assert not re.search(r"<link|<img|<iframe|\bsrc=|@import|url\(", html)
    assert set(re.findall(r"https?://[^\s\"']+", html)) <= {"http://www.w3.org/2000/svg"}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_chromium_shows_the_report(report_html: Path, folders: PipelineFolders, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    model = onnx.load(str(folders["quantized"] / "prefill.onnx"), load_external_data=False)
    out, inp = next(list(t.dims) for t in model.graph.initializer if t.name.endswith("0.self_attn.q_a_proj.weight"))
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        report_html.as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    # the inline script ran in the browser and counted what the page shows
    assert re.search(r'id="status">rendered: 1 graphs, 4 layers, 4 bars<', dom), dom[:2000]
    summaries = re.findall(r"<summary>(.*?)<span", dom)
    assert summaries == ["layer 0", "layer 1", "layer 2", "outside layers"]
    assert "quantized (fp8, block 128): 8 linears (7 with fp8 activations, 1 weight-only)" in dom
    scale = [-(-out // 128), -(-inp // 128)]
    assert f"self_attn.q_a_proj (MatMul): weight float8e4m3fn[{out}, {inp}], scale {scale}" in dom
    bars = re.findall(r'<rect class="bar( jump)?" data-layer="([^"]+)"', dom)
    assert [layer for _, layer in bars] == ["0", "1", "2", "None"]
    assert bars[0][0] == " jump"  # the first quantized linear is in layer 0
    assert "max relative error per layer" in dom and "first jump: layer 0" in dom
