"""The ort lowering's fusions: every RMSNorm as SimplifiedLayerNormalization, the residual Add before it
folded into SkipSimplifiedLayerNormalization, every RoPE as com.microsoft::RotaryEmbedding, and the same
numbers as the unfused lowering.

bench/ort_step_nodes.py measured the `small` preset's static decode step at 940 nodes unfused and 534
fused on the CPU provider (bench/results/ort_step_nodes_small_cpu_2026-12-01.json).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx_ir as ir
import pytest
import torch
from dsv3c.artifact import provenance
from dsv3c.artifact.manifest import read_manifest
from dsv3c.passes.rope import Rope
from dsv3c.passes.rope import match as rope_match
from dsv3c.runtime.ort_backend import OrtEngine
from dsv3c.runtime.ort_cuda_graph import StaticDecoder

from .fixtures.exports import lower_ort

NORM = "SimplifiedLayerNormalization"
SKIP = "com.microsoft::SkipSimplifiedLayerNormalization"
ROTARY = "com.microsoft::RotaryEmbedding"
NORM_OPS = ("Pow", "ReduceMean", "Sqrt", "Reciprocal")  # what only the decomposed RMSNorm uses


@pytest.fixture(scope="module")
def lowerings(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ort-fusions")
    return {name: lower_ort(tiny_export, root / name, ort_fusions=name == "fused") for name in ("unfused", "fused")}


def _ops(model: ir.Model) -> Counter[str]:
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph)


@pytest.mark.parametrize("role", ["prefill", "decode", "mtp"])
def test_every_rmsnorm_is_fused_and_the_graph_is_smaller(lowerings: dict[str, Path], role: str) -> None:
    unfused, fused = (ir.load(lowerings[n] / f"{role}.onnx") for n in ("unfused", "fused"))
    before, after = _ops(unfused), _ops(fused)
    norms = before["Pow"]
    assert norms > 0 and before[NORM] == before[SKIP] == 0
    assert after[NORM] + after[SKIP] == norms and after[SKIP] > 0
    assert not any(after[op] for op in NORM_OPS)
    ropes = sum(isinstance(rope_match(n), Rope) for n in unfused.graph if n.op_type == "Reshape")
    assert ropes > 0 and after[ROTARY] == ropes
    assert not any(isinstance(rope_match(n), Rope) for n in fused.graph if n.op_type == "Reshape")
    # per norm 7 nodes become 1 and each residual Add goes into its norm; per rope 13 nodes become 1 to 3, less
    # the cos/sin cache each graph builds once (shape arithmetic and Constants onnxruntime folds at load)
    assert after.total() < before.total() - 6 * norms - after[SKIP] - 5 * ropes
    names = {n.name for n in unfused.graph}
    for node in fused.graph:
        if node.op_type in (NORM, SKIP.split("::")[1], ROTARY.split("::")[1]):
            marks = provenance.read(node)
            assert marks.stage in ("ort-fusions", "ort-rotary") and marks.rewrite is not None
            assert marks.rewrite.kind == provenance.LOWERED
            replaced = [n for n in unfused.graph if n.name in marks.origin]
            assert set(marks.origin) <= names and replaced
            if node.op_type == ROTARY.split("::")[1]:  # the rope's final Reshape, which the rest is dominated by
                assert [n.op_type for n in replaced] == ["Reshape"] and node.attributes["interleaved"].as_int() == 1
            else:
                assert {n.op_type for n in replaced} >= {"Pow", "Reciprocal", "Mul"}
                assert node.attributes["epsilon"].as_float() == pytest.approx(1e-6)
    changes = next(s for s in read_manifest(lowerings["fused"]).stages if s.get("stage") == "lower")["changes"]
    assert changes["ort-fusions"][role]["fused"] == {NORM: after[NORM], SKIP: after[SKIP]}
    assert changes["ort-rotary"][role]["rotary_embedding"] == ropes


def test_fused_lowering_computes_what_the_unfused_one_does(lowerings: dict[str, Path]) -> None:
    ids, positions = torch.tensor([[3, 7, 1, 9, 4]]), torch.arange(5)[None]
    engines = {name: OrtEngine(folder) for name, folder in lowerings.items()}
    for engine in engines.values():
        engine.start(1, 16)
    a, b = (e.prefill(ids, positions).logits for e in engines.values())
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    step = torch.tensor([[5]])
    a, b = (e.decode(a.argmax(-1)[:, -1:], step).logits for e in engines.values())
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_fused_decode_runs_as_a_static_step_with_fewer_nodes(lowerings: dict[str, Path]) -> None:
    """The session CUDA graphs replay (fixed batch and capacity), here on the CPU: same logits, fewer nodes,
    and the fused ops among those that ran."""
    logits, ran = {}, {}
    for name, folder in lowerings.items():
        decoder = StaticDecoder(folder, 1, 32, device="cpu", cuda_graph=False, profile=True)
        logits[name] = decoder.step(torch.tensor([[7]]), torch.tensor([[3]])).clone()  # rotated: position > 0
        placement = decoder.placement()
        assert not placement.off_device
        ran[name] = placement.by_provider["CPUExecutionProvider"]
    a, b = logits["unfused"], logits["fused"]
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert ran["fused"] < ran["unfused"]


def test_cli_no_fusions_keeps_the_exported_norms(tiny_export: Path, tmp_path: Path) -> None:
    from dsv3c.cli.main import main

    out = tmp_path / "plain"
    assert main(["lower", str(tiny_export), "--target", "ort", "--no-fusions", "--out", str(out)]) == 0
    ops = _ops(ir.load(out / "decode.onnx"))
    assert ops["Pow"] > 0 and not any("Normalization" in op or "Rotary" in op for op in ops)
    trt = ["lower", str(tiny_export), "--target", "trt", "--no-fusions", "--out", str(tmp_path / "trt")]
    assert main(trt) == 2 and not (tmp_path / "trt").exists()
