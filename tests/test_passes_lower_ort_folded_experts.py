"""The ort lowering writes float experts as the kernel reads them: fc1 interleaved, in its precision.

Built in the graph instead (Concat/Reshape/Cast over the expert weights), onnxruntime folded them at every
session load: `bench/session_load.py` measured the `small` preset's decode at 7.0 s to load before and
0.84 s after on the 2-core CPU (bench/results/session_load_small_ort_cpu_2026-12-01.json).
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
from dsv3c.passes.lower import lower_folder
from dsv3c.passes.pipelines import Target
from dsv3c.runtime.ort_backend import OrtEngine


def _lowered_experts(export: Path, out: Path, dtype: ir.DataType) -> list[tuple[ir.Value, ir.Value, np.ndarray]]:
    """Lower `export` for ort; per com.microsoft::MoE of its decode graph: (fc1, fc2, the fc1 expected
    from the canonical gate and up weights: rows g0, u0, g1, u1, ... in `dtype`). Checks that both are
    weights of `dtype`, that the stacked gate/up weights are gone and no interleave is left in the graph."""
    lowered = lower_folder(export, out, Target.ORT).folder
    assert lowered is not None
    canonical = ir.load(export / "decode.onnx").graph.initializers
    graph = ir.load(lowered / "decode.onnx").graph
    moes = [n for n in graph if n.domain == "com.microsoft" and n.op_type == "MoE"]
    assert moes
    rows = []
    for moe in moes:
        fc1, fc2 = moe.inputs[2], moe.inputs[4]
        assert fc1 is not None and fc2 is not None and fc1.is_initializer() and fc2.is_initializer()
        assert fc1.dtype == fc2.dtype == dtype and fc1.name is not None
        prefix = fc1.name.split("gate_up_proj.weight")[0]
        gate = canonical[prefix + "gate_proj.weight"].const_value.numpy()  # type: ignore[union-attr]
        up = canonical[prefix + "up_proj.weight"].const_value.numpy()  # type: ignore[union-attr]
        want = np.stack([gate, up], axis=2).reshape(gate.shape[0], 2 * gate.shape[1], gate.shape[2])
        # the folder stores the experts once
        assert prefix + "gate_proj.weight" not in graph.initializers
        rows.append((fc1, fc2, want.astype(dtype.numpy())))
    assert not any(n.op_type == "Concat" and n.name.endswith("gate_up") for n in graph)
    return rows


def test_float_experts_are_stored_interleaved_and_the_lowering_computes_the_same(tiny_export: Path, tmp_path: Path):
    for fc1, _, want in _lowered_experts(tiny_export, tmp_path / "ort", ir.DataType.FLOAT):
        np.testing.assert_array_equal(fc1.const_value.numpy(), want)  # type: ignore[union-attr]
    ids, positions = torch.tensor([[3, 7, 1, 9, 4]]), torch.arange(5)[None]
    canonical, lowered = OrtEngine(tiny_export), OrtEngine(tmp_path / "ort")
    for engine in (canonical, lowered):
        engine.start(1, 16)
    a, b = canonical.prefill(ids, positions).logits, lowered.prefill(ids, positions).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_bf16_experts_are_stored_in_the_kernels_float16(tiny_checkpoint: Path, tmp_path: Path):
    """onnxruntime-gpu has no bf16 MoE kernel: the lowering stores bf16 experts converted to float16."""
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder

    folder = tmp_path / "bf16"
    export(from_folder(tiny_checkpoint), folder, weights="checkpoint", dtype="bf16")
    canonical = ir.load(folder / "decode.onnx").graph.initializers
    for fc1, fc2, want in _lowered_experts(folder, tmp_path / "bf16-ort", ir.DataType.FLOAT16):
        # the routed experts first; the shared one follows them (test_passes_lower_ort_shared_experts.py)
        routed = len(want)
        np.testing.assert_array_equal(fc1.const_value.numpy()[:routed], want)  # type: ignore[union-attr]
        assert fc2.name is not None and fc2.name.endswith("down_proj.weight_with_shared_float16")
        down = canonical[fc2.name.removesuffix("_with_shared_float16")].const_value.numpy()  # type: ignore[union-attr]
        assert down.dtype == ml_dtypes.bfloat16
        got = fc2.const_value.numpy()[:routed]  # type: ignore[union-attr]
        np.testing.assert_array_equal(got, down.astype(np.float16))
