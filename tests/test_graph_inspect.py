"""dsv3c inspect: ops, parameters by dtype, custom nodes, FP8 coverage, cache layout, external data."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from dsv3c.cli import inspect_kinds as inspect_mod
from dsv3c.cli import main as cli
from dsv3c.errors import UserError
from dsv3c.graph.render_text import render_inspect
from dsv3c.graph.summary import inspect_path

from .fixtures.synthetic import Topology, build_model, inline_custom, write_export

TOPO = Topology(layers=2, dense_layers=1)


def _run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(cli, "COMMANDS", [*dict.fromkeys([*cli.COMMANDS, "inspect", "diff"])])
    return cli.main(argv)


def _linear_flops(t: Topology) -> float:
    """Linear FLOPs per token of TOPO's graph (2 layers, the second MoE); the quantized graphs' split into fp8
    and high precision is checked on the real pipeline (tests/test_graph_pipeline.py)."""
    d = t.hidden
    attn = d * t.q_rank + t.q_rank * t.heads_dim + d * t.kv_rank + t.heads_dim * d  # MatMuls
    kv_b = t.kv_rank * t.heads_dim  # read by the MLAAttention node
    dense, shared = 3 * d * t.ff, 3 * d * t.moe_ff
    routed = 3 * t.moe_ff * d * t.top_k  # E experts, top_k of them per token
    router_and_head = t.experts * d + d * t.vocab
    return 2.0 * (2 * attn + dense + shared + 2 * kv_b + routed + router_and_head)


def test_summary_of_a_plain_graph(tmp_path: Path) -> None:
    model = build_model(TOPO)
    onnx.save(model, tmp_path / "m.onnx")
    (s,) = inspect_path(tmp_path / "m.onnx").graphs
    assert s.nodes == len(model.graph.node) and s.ops["MatMul"] == 15 and s.ops["dsv3c::MoE"] == 1
    assert (s.ir_version, s.opsets) == (10, {"ai.onnx": 21, "dsv3c": 1})
    assert s.parameters == sum(onnx.numpy_helper.to_array(x).size for x in model.graph.initializer)
    assert {r.dtype for r in s.by_dtype} == {"float", "int64"} and s.data == "present"
    custom = {c.op: c for c in s.custom_nodes}
    assert custom["dsv3c::MLAAttention"].count == 2 and custom["dsv3c::MLAAttention"].layers == [0, 1]
    moe = custom["dsv3c::MoE"].attributes
    assert moe["top_k"] == "2" and moe["scoring_func"] == "sigmoid"
    assert s.functions == {"dsv3c::MLAAttention": 3, "dsv3c::MoE": 13}
    flops = _linear_flops(TOPO)
    # 7 MatMuls per layer, kv_b_proj x2, the router and the experts of the MoE node, lm_head
    assert s.fp8.linears == 19 and s.fp8.flops == pytest.approx(flops) and s.fp8.share == 0.0
    text = render_inspect(inspect_path(tmp_path / "m.onnx"))
    assert "dsv3c::MLAAttention x2 (layers 0-1): num_heads=2, softmax_scale=0.125" in text
    assert "fp8: 0.0% of linear FLOPs" in text and "external data: (none)" in text


def test_export_folder_with_weights_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = build_model(Topology(layers=2, data=False))
    write_export(tmp_path / "exp", {"prefill": model, "decode": inline_custom(model)}, layers=2)
    report = inspect_path(tmp_path / "exp")
    assert report.kind == "export folder" and [g.role for g in report.graphs] == ["prefill", "decode"]
    assert report.cache_layout is not None and report.cache_layout["ckv_width"] == 512
    prefill = report.graphs[0]
    assert prefill.external_files[0].location == "weights.bin" and prefill.external_files[0].size is None
    assert report.graphs[1].custom_nodes == [] and report.graphs[1].functions == {}
    assert _run_cli(["inspect", str(tmp_path / "exp"), "--format", "json"], monkeypatch) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["graphs"][0]["fp8"]["share"] == 0.0 and data["cache_layout"]["layers"] == 2
    assert _run_cli(["inspect", str(tmp_path / "exp")], monkeypatch) == 0
    text = capsys.readouterr().out
    assert text.startswith("export folder") and "weights.bin: missing" in text and "== decode:" in text


def test_handlers_dispatch_on_what_a_folder_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "engine_manifest.json").write_text("{}")
    assert inspect_mod.find_handler(tmp_path / "engines").kind == "tensorrt engine folder"
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match="not something dsv3c can inspect"):
        inspect_mod.find_handler(tmp_path / "other")
    custom = inspect_mod.Handler("json list", lambda p: p.suffix == ".jsonl", "json:loads", "builtins:str")
    monkeypatch.setattr(inspect_mod, "HANDLERS", [custom, *inspect_mod.HANDLERS])
    (tmp_path / "x.jsonl").touch()
    handler = inspect_mod.find_handler(tmp_path / "x.jsonl")
    assert handler.kind == "json list"
    assert handler.call("inspect", "[1]") == [1]
