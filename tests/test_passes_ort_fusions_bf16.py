"""The ort lowering's fusions on a bf16 export: the norms computed in float32 between Casts fuse too, with
the bf16 tensors as the fused ops' inputs (the CUDA kernels' bf16 types) and float32 statistics."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import torch
from dsv3c.passes.lower import lower_folder
from dsv3c.passes.pipelines import Target
from dsv3c.runtime.ort_backend import OrtEngine

NORM = "SimplifiedLayerNormalization"
SKIP = "com.microsoft::SkipSimplifiedLayerNormalization"
ROTARY = "com.microsoft::RotaryEmbedding"
NORM_OPS = ("Pow", "ReduceMean", "Sqrt", "Reciprocal")  # what only the decomposed RMSNorm uses


def test_bf16_export_fuses_with_the_norm_computed_in_float32(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A bf16 export computes each norm in float32 between Casts: the fused ops take the bf16 tensors and
    stash in float32 (the CUDA kernels' bf16 inputs with float statistics); on the CPU, whose provider lacks
    bf16 kernels, the runtime computes both lowerings in float32 (runtime/float_compute.py)."""
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder

    source = tmp_path / "bf16"
    export(from_folder(tiny_checkpoint), source, weights="checkpoint", dtype="bf16")
    folders = {}
    for name in ("unfused", "fused"):
        folders[name] = lower_folder(source, tmp_path / name, Target.ORT, ort_fusions=name == "fused").folder
        assert folders[name] is not None
    graph = ir.load(folders["fused"] / "decode.onnx").graph
    fused = [n for n in graph if n.op_type in (NORM, SKIP.split("::")[1], ROTARY.split("::")[1])]
    assert fused and not any(n.op_type in NORM_OPS for n in graph)
    for node in fused:
        floats = [v for v in node.inputs if v is not None and v.dtype != ir.DataType.INT64]  # not position ids
        # the export rotates in float32 (models/rope.py), so the rope's op does too
        want = ir.DataType.FLOAT if node.op_type == ROTARY.split("::")[1] else ir.DataType.BFLOAT16
        assert floats and all(v.dtype == want for v in floats) and node.outputs[0].dtype == want
        if node.op_type == NORM:
            assert node.attributes["stash_type"].as_int() == ir.DataType.FLOAT
    ids, positions = torch.tensor([[3, 7, 1, 9, 4]]), torch.arange(5)[None]
    engines = [OrtEngine(folder) for folder in folders.values()]
    for engine in engines:
        engine.start(1, 16)
    a, b = (e.prefill(ids, positions).logits for e in engines)
    assert (a - b).abs().max() <= 3e-2 * a.abs().max()
