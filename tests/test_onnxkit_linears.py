"""The one linear finder (onnxkit/linears.py): its two views of a graph agree, before and after quantization."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest
from dsv3c.onnxkit.linears import FP8_TYPES, LinearKind, _granularity, find_linears, rewritable_linears

from .fixtures.exports import mini_export

# what each rewritable form is called in the described view
_DESCRIBED_AS = {
    LinearKind.MATMUL: "matmul",
    LinearKind.MLA_KV_B: "custom",
    LinearKind.MOE_ROUTER: "custom",
    LinearKind.MOE_EXPERTS: "experts",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from dsv3c.passes.pipelines import QuantizeOptions
    from dsv3c.passes.quantize import quantize_folder

    root = tmp_path_factory.mktemp("linears")
    export = mini_export(root, "fp32")
    quantize_folder(export, root / "fp8", QuantizeOptions())
    return export, root / "fp8"


@pytest.mark.parametrize("which", [0, 1], ids=["export", "quantized"])
@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_rewritable_uses_are_described_linears(folders: tuple[Path, Path], which: int, role: str) -> None:
    graph = ir.load(folders[which] / f"{role}.onnx").graph
    uses = rewritable_linears(graph)
    described = {w: lin for lin in find_linears(graph) for w in lin.weights}
    assert {u.kind for u in uses} == set(LinearKind)
    for use in uses:
        linear = described[use.weight]  # the same initializer, found by the same walk
        assert linear.node is use.user and linear.kind == _DESCRIBED_AS[use.kind]
    fp8 = [lin for lin in described.values() if lin.kind == "matmul" and lin.fp8_weight]
    if which == 0:
        assert not fp8 and not any(lin.fp8_weight for lin in described.values())
    else:  # the default policy: block-quantized weights, online 1x128 activations (lm_head stays high precision)
        assert len(fp8) >= 7 * 2  # the seven linears of each layer's attention and dense MLP at least
        assert {(lin.scheme, lin.activation) for lin in fp8} == {("fp8, block 128", "fp8, 1x128 tiles (online)")}
        fp8_uses = [u for u in uses if ir.DataType(u.weight.dtype) in FP8_TYPES and u.kind == LinearKind.MATMUL]
        assert {described[u.weight] for u in fp8_uses} == set(fp8)


@pytest.mark.parametrize(
    ("weight", "scale", "label"),
    [
        ((256, 512), (), "per-tensor"),
        ((256, 512), (1, 1), "per-tensor"),
        ((256, 512), (256,), "per-channel"),
        ((256, 512), (2, 4), "block 128"),
        ((256, 512), (2, 4, 1), "block 128"),
        ((64, 512), (1, 4), "block 128"),  # one scale over a dimension shorter than the block
        ((256, 512), (256, 4), "block 1x128"),
        ((8, 256, 512), (8,), "per-expert"),
        ((8, 256, 512), (8, 2, 4), "block 128"),
    ],
)
def test_granularity_names_the_scale_layout(weight: tuple[int, ...], scale: tuple[int, ...], label: str) -> None:
    assert _granularity(weight, scale) == label
