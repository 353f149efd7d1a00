"""The ort lowering writes float experts as the kernel reads them: fc1 interleaved, in its precision.

Built in the graph instead (Concat/Reshape/Cast over the expert weights), onnxruntime folded them at every
session load: the `small` preset's decode took 12.7 s to load on the 2-core CPU (0.15 s without graph
optimizations) and 1.0 s once folded here; a bf16 V2-Lite took over 130 s per session on the H200.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
from dsv3c.passes.lower import lower_folder
from dsv3c.passes.pipelines import Target
from dsv3c.runtime.ort_backend import OrtEngine


def _moes(folder: Path, role: str = "decode") -> tuple[ir.Model, list[ir.Node]]:
    model = ir.load(folder / f"{role}.onnx")
    return model, [n for n in model.graph if n.domain == "com.microsoft" and n.op_type == "MoE"]


def _experts(model: ir.Model, prefix: str) -> dict[str, np.ndarray]:
    return {
        k: v.const_value.numpy()  # type: ignore[union-attr]
        for k, v in model.graph.initializers.items()
        if k.startswith(prefix) and ("gate_proj" in k or "up_proj" in k or "down_proj" in k)
    }


def test_float_experts_are_stored_interleaved_and_the_lowering_computes_the_same(tiny_export: Path, tmp_path: Path):
    out = lower_folder(tiny_export, tmp_path / "ort", Target.ORT).folder
    assert out is not None
    canonical = ir.load(tiny_export / "decode.onnx")
    model, moes = _moes(out)
    assert moes
    for moe in moes:
        fc1, fc2 = moe.inputs[2], moe.inputs[4]
        assert fc1 is not None and fc2 is not None and fc1.is_initializer() and fc2.is_initializer()
        assert fc1.dtype == fc2.dtype == ir.DataType.FLOAT
        prefix = fc1.name.removesuffix("gate_up_proj.weight")  # type: ignore[union-attr]
        src = _experts(canonical, prefix)
        gate, up = src[prefix + "gate_proj.weight"], src[prefix + "up_proj.weight"]
        want = np.stack([gate, up], axis=2).reshape(gate.shape[0], 2 * gate.shape[1], gate.shape[2])
        np.testing.assert_array_equal(fc1.const_value.numpy(), want)  # type: ignore[union-attr]
        # the stacked gate and up weights are gone: the folder stores the experts once
        assert prefix + "gate_proj.weight" not in model.graph.initializers
    # no Concat/Reshape/Cast of expert weights is left for onnxruntime to fold at load
    assert not any(n.op_type == "Concat" and n.name.endswith("gate_up") for n in model.graph)
    ids = np.array([[3, 7, 1, 9, 4]])
    a, b = OrtEngine(tiny_export), OrtEngine(out)
    for engine in (a, b):
        engine.start(1, 16)
    import torch

    ta, tb = torch.from_numpy(ids), torch.arange(5)[None]
    la, lb = a.prefill(ta, tb).logits, b.prefill(ta, tb).logits
    assert (la - lb).abs().max() <= 1e-5 * la.abs().max()


def test_bf16_experts_are_stored_in_the_kernels_float16(tiny_checkpoint: Path, tmp_path: Path):
    """onnxruntime-gpu has no bf16 MoE kernel: the lowering stores bf16 experts converted to float16."""
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder

    folder = tmp_path / "bf16"
    export(from_folder(tiny_checkpoint), folder, weights="checkpoint", dtype="bf16")
    out = lower_folder(folder, tmp_path / "bf16-ort", Target.ORT).folder
    assert out is not None
    canonical = ir.load(folder / "decode.onnx")
    _, moes = _moes(out)
    assert moes
    for moe in moes:
        fc1, fc2 = moe.inputs[2], moe.inputs[4]
        assert fc1 is not None and fc2 is not None and fc1.dtype == fc2.dtype == ir.DataType.FLOAT16
        assert fc2.name is not None and fc2.name.endswith("down_proj.weight_float16")
        down = _experts(canonical, fc2.name.removesuffix("down_proj.weight_float16"))
        (source,) = [v for k, v in down.items() if k.endswith("down_proj.weight")]
        assert source.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(fc2.const_value.numpy(), source.astype(np.float16))  # type: ignore[union-attr]
