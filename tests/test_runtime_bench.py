"""The CPU benchmark in CI size: tiny model, tiny contexts, every runtime, JSON rows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from dsv3c.cli import cmd_bench
from dsv3c.errors import UserError
from dsv3c.models.config import DeepseekV3Config
from dsv3c.runtime.bench.memory import weight_bytes_per_step

pytest.importorskip("transformers")


def bench(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cmd_bench.add_arguments(parser)
    return cmd_bench.run(parser.parse_args(list(argv)))


def test_bench_smoke(
    tiny_checkpoint: Path, tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    code = bench(
        "--checkpoint",
        str(tiny_checkpoint),
        "--export",
        str(tiny_export),
        "--contexts",
        "20",
        "--batches",
        "1",
        "2",
        "--steps",
        "2",
        "--prefill-chunk",
        "16",
        "--bandwidth-mb",
        "16",
        "--out",
        str(out),
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["command"] and result["commit"] and result["machine"]["cpus"]  # what a result file records
    rows = result["rows"]
    assert len(rows) == 3 * 2 * 2  # runtimes x batches x phases
    required = {"runtime", "phase", "context", "batch", "tokens_per_s", "cache_bytes_per_token", "bandwidth_fraction"}
    assert all(required <= row.keys() and row["tokens_per_s"] > 0 for row in rows)
    c = DeepseekV3Config.from_json(tiny_checkpoint / "config.json")
    latent = (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * 4
    assert {r["cache_bytes_per_token"] for r in rows if r["runtime"] in ("ort", "torch")} == {latent}
    assert all(r["cache_bytes_per_token"] > 0 for r in rows if r["runtime"] == "transformers")
    text = capsys.readouterr().out
    assert "memory bandwidth" in text and "ort vs transformers, decode ctx 20 b 2" in text


def test_bench_needs_both_folders(tiny_checkpoint: Path) -> None:
    with pytest.raises(UserError, match="both --checkpoint and --export"):
        bench("--checkpoint", str(tiny_checkpoint))


def test_weight_bytes_count_reached_experts() -> None:
    c = DeepseekV3Config.from_preset("tiny")
    one, many = weight_bytes_per_step(c, 1, 4), weight_bytes_per_step(c, 1000, 4)
    assert c.n_routed_experts is not None and c.num_experts_per_tok is not None
    expert = 3 * c.hidden_size * c.moe_intermediate_size * 4
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    embed_rows = (min(1000, c.vocab_size) - 1) * c.hidden_size * 4
    assert many - one == moe_layers * expert * (c.n_routed_experts - c.num_experts_per_tok) + embed_rows


def test_bench_runs_the_ort_lowering_it_makes_by_default(tmp_path: Path) -> None:
    """Without --export, bench writes, exports and lowers a checkpoint: onnxruntime runs the graph to deploy."""
    from dsv3c.artifact.manifest import read_manifest

    args = ["--preset", "tiny", "--work", str(tmp_path), "--runtimes", "ort", "--contexts", "8", "--steps", "1"]
    assert bench(*args, "--prefill-chunk", "8", "--bandwidth-mb", "16", "--out", str(tmp_path / "b.json")) == 0
    lowered = read_manifest(tmp_path / "tiny-ort")
    assert [s.get("target") for s in lowered.stages if s.get("stage") == "lower"] == ["ort"]
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"tiny (ort)"} and len(rows) == 2
