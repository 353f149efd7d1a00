"""The ort lowering stores float linear weights transposed, as their MatMul reads them, and computes the same.

onnxruntime folded the exporter's `Transpose(W)` at every session load; bench/session_load.py measures
what storing `W.T` saves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from dsv3c.artifact.names import TRANSPOSED_SUFFIX
from dsv3c.passes.merged_matmuls import merged_parts
from dsv3c.passes.pipelines import QuantizeOptions
from dsv3c.passes.quantize import quantize_folder
from dsv3c.runtime.ort_backend import OrtEngine

from .fixtures.exports import lower_ort


def _transposed_initializers(graph: ir.Graph) -> int:
    return sum(
        1 for n in graph if n.op_type == "Transpose" and n.inputs[0] is not None and n.inputs[0].is_initializer()
    )


@pytest.fixture(scope="module")
def lowered(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lower_ort(tiny_export, tmp_path_factory.mktemp("transposed") / "ort")


@pytest.mark.parametrize("role", ["prefill", "decode", "mtp"])
def test_every_float_linear_weight_is_stored_transposed(tiny_export: Path, lowered: Path, role: str) -> None:
    canonical = ir.load(tiny_export / f"{role}.onnx").graph
    graph = ir.load(lowered / f"{role}.onnx").graph
    assert _transposed_initializers(canonical) > 0
    assert _transposed_initializers(graph) == 0
    stored = [v for name, v in graph.initializers.items() if name.endswith(TRANSPOSED_SUFFIX)]
    assert stored
    for value in stored:
        assert value.name is not None and value.const_value is not None
        # MatMuls of one activation read one weight, their parts side by side (passes/merged_matmuls.py)
        parts = [canonical.initializers[n.removesuffix(TRANSPOSED_SUFFIX)] for n in merged_parts(value.name)]
        assert all(p.const_value is not None for p in parts)
        expected = np.concatenate([p.const_value.numpy().T for p in parts], axis=1)  # type: ignore[union-attr]
        np.testing.assert_array_equal(value.const_value.numpy(), expected)
        # the [out, in] original is not kept beside it when only MatMuls read it
        assert all(u.node.op_type == "MatMul" for u in value.uses())
        assert not any(p.name in graph.initializers for p in parts)


def test_the_lowering_computes_the_same_logits(tiny_export: Path, lowered: Path) -> None:
    ids, positions = torch.tensor([[3, 7, 1, 9, 4]]), torch.arange(5)[None]
    canonical, ort = OrtEngine(tiny_export), OrtEngine(lowered)
    for engine in (canonical, ort):
        engine.start(1, 16)
    a, b = canonical.prefill(ids, positions).logits, ort.prefill(ids, positions).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    step = torch.tensor([[5]]), torch.tensor([[5]])
    a, b = canonical.decode(*step).logits, ort.decode(*step).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_fp8_weights_keep_their_bytes(tiny_export: Path, tmp_path: Path) -> None:
    """Transposing an FP8 weight would store a float copy: its DequantizeLinear and Transpose stay."""
    quantized = tmp_path / "fp8"
    quantize_folder(tiny_export, quantized, QuantizeOptions(block=(16, 16)))
    graph = ir.load(lower_ort(quantized, tmp_path / "fp8-ort") / "decode.onnx").graph
    fp8 = [v for v in graph.initializers.values() if v.dtype == ir.DataType.FLOAT8E4M3FN]
    assert fp8
    assert not any(
        name.removesuffix(TRANSPOSED_SUFFIX) in {v.name for v in fp8}
        for name in graph.initializers
        if name.endswith(TRANSPOSED_SUFFIX)
    )
    assert any(
        n.op_type == "Transpose"
        and n.inputs[0] is not None
        and n.inputs[0].producer() is not None
        and n.inputs[0].producer().op_type == "DequantizeLinear"
        for n in graph
    )  # type: ignore[union-attr]
