"""The diff of an FP8 checkpoint's export against its quantized form: the weights were FP8 already, so what
`quantize` changed is the activations; the passes' marks group those nodes per linear, leaving no node
reported on its own as added."""

from __future__ import annotations

import json
from pathlib import Path

from dsv3c.cli.main import main


def test_activation_only_quantization_groups_per_linear(tmp_path: Path, capsys) -> None:
    ckpt, export, fp8 = tmp_path / "ckpt", tmp_path / "export", tmp_path / "fp8"
    assert main(["init", "--preset", "tiny", "--out", str(ckpt), "--dtype", "fp8", "--seed", "0"]) == 0
    assert main(["export", str(ckpt), "--out", str(export)]) == 0
    assert main(["quantize", str(export), "--out", str(fp8)]) == 0
    capsys.readouterr()
    assert main(["diff", str(export), str(fp8), "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    for graph in report["graphs"]:
        quantized = [r for r in graph["rewrites"] if r["kind"] == "quantized"]
        assert quantized and all(r["activation"].startswith("fp8, 1x128") for r in quantized), graph["role"]
        assert all(r["label"].startswith("activations quantized (weights fp8") for r in quantized)
        assert all(r["stage"] == "fp8-activations" for r in quantized)
        assert not [n for n in graph["nodes"] if n["kind"] in ("added", "removed")], graph["role"]
