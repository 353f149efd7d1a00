"""On the CPU, dsv3c's runtimes compute a 16-bit ort lowering in float32, its MoE and QMoE included: the
CPU EP of onnxruntime-gpu 1.31.1 returns wrong outputs for a float16 com.microsoft::MoE that does not
renormalize (docs/toolchain.md), and the pinned onnxruntime's float16 MoE is not what its CPU users run."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from dsv3c.passes.lower import lower_folder
from dsv3c.passes.pipelines import Target
from dsv3c.runtime.ort_session import float_compute, half_on_cpu
from onnx import shape_inference


@pytest.mark.parametrize("weights_8bit", [None, 32], ids=["moe", "qmoe"])
def test_a_16bit_lowerings_experts_run_in_float32_on_the_cpu(
    weights_8bit: int | None, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder

    export(from_folder(tiny_checkpoint), tmp_path / "bf16", weights="checkpoint", dtype="bf16")
    folder = lower_folder(tmp_path / "bf16", tmp_path / "ort", Target.ORT, weights_8bit=weights_8bit).folder
    assert folder is not None
    op = "QMoE" if weights_8bit else "MoE"
    for role in ("prefill", "decode"):
        path = folder / f"{role}.onnx"
        stored = onnx.load(path, load_external_data=False)
        assert any(n.op_type == op for n in stored.graph.node) and half_on_cpu(path, "cpu")
        # the kernel's type T is its input's (onnx infers no type through a com.microsoft op)
        assert kernel_types(stored, op) == {onnx.TensorProto.FLOAT16}  # as the GPU runs it
        assert kernel_types(onnx.load_from_string(float_compute(path)), op) == {onnx.TensorProto.FLOAT}


def kernel_types(model: onnx.ModelProto, op: str) -> set[int]:
    graph = shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    return {types.get(n.input[0], 0) for n in graph.node if n.op_type == op}
