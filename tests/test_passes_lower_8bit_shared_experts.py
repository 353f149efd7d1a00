"""`lower --target ort --weights-8bit` of a 16-bit export runs DeepSeekMoE's shared experts inside QMoE, as
the float lowering runs them inside com.microsoft::MoE: n more 8-bit experts, always chosen at weight 1,
quantized to the bytes MatMulNBits would have read (passes/lower_ort_8bit.py: foldable_shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from dsv3c.artifact.names import MERGED_JOIN
from dsv3c.passes.lower import lower_folder
from dsv3c.passes.merged_matmuls import merged_parts
from dsv3c.passes.pipelines import Target

from .fixtures.exports import greedy_logits as _logits
from .fixtures.exports import mini_config, shared_expert_exports

SHARED = 2
BLOCK = 32
# measured on this mini model (seed 3, block 32): the folded and the apart 8-bit graphs' logits differ by
# 5.8e-3 of the largest logit (QMoE quantizes its activations per block as MatMulNBits does, in another
# order), each 1.6e-2 from the float lowering
FOLDED_VS_APART = 2e-2
EIGHT_BIT_VS_FLOAT = 5e-2


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shared-8bit")
    shared_expert_exports(root, SHARED, seed=3, dtypes=("bf16", "fp32"))
    made = {
        "folded": lower_folder(root / "bf16", root / "folded", Target.ORT, weights_8bit=BLOCK),
        "apart": lower_folder(
            root / "bf16", root / "apart", Target.ORT, weights_8bit=BLOCK, shared_experts_in_moe=False
        ),
        "fp32": lower_folder(root / "fp32", root / "fp32-8bit", Target.ORT, weights_8bit=BLOCK),
        "float": lower_folder(root / "bf16", root / "float", Target.ORT),
        "experts": lower_folder(root / "bf16", root / "experts", Target.ORT, weights_8bit=BLOCK, linears_8bit=False),
    }
    out = {name: result.folder for name, result in made.items()}
    assert all(folder is not None for folder in out.values())
    return out  # type: ignore[return-value]


def _initializers(folder: Path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(folder / "decode.onnx")).graph
    return {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}


def _part(initializers: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The rows of MatMulNBits weight `name`: an initializer of its own, or its rows in a merged one
    (passes/merged_matmuls.py stacks the parts' rows in the order of the parts' names). Only parts of
    equal rows are looked up here (a shared MLP's gate and up)."""
    if name in initializers:
        return initializers[name]
    merged = next(n for n in initializers if name in merged_parts(n) and MERGED_JOIN in n)
    parts, rows = merged_parts(merged), initializers[merged]
    size, i = len(rows) // len(parts), merged_parts(merged).index(name)
    return rows[i * size : (i + 1) * size]


def test_qmoe_holds_the_shared_experts_as_matmul_nbits_would_have_read_them(folders: dict[str, Path]) -> None:
    config = mini_config(n_shared_experts=SHARED)
    experts, ff = config.n_routed_experts, config.moe_intermediate_size
    graph = onnx.load(str(folders["folded"] / "decode.onnx")).graph
    qmoe = [n for n in graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == config.num_hidden_layers - config.first_k_dense_replace
    for node in qmoe:
        k = next(a.i for a in node.attribute if a.name == "k")
        assert k == config.num_experts_per_tok + SHARED
    nbits = {n.input[1] for n in graph.node if n.op_type == "MatMulNBits"}
    assert nbits and not [name for name in nbits if "shared_experts" in name]
    folded, apart = _initializers(folders["folded"]), _initializers(folders["fp32"])
    prefix = "model.layers.1.mlp."
    fc1 = folded[prefix + "experts.gate_up_proj.weight_with_shared_q8"]  # [E + n, 2 ff, D]
    fc2 = folded[prefix + "experts.down_proj.weight_with_shared_q8"]  # [E + n, D, ff]
    assert fc1.shape[0] == fc2.shape[0] == experts + SHARED
    np.testing.assert_array_equal(fc1[:experts], apart[prefix + "experts.gate_up_proj.weight_q8"])
    # MatMulNBits' rows [N, K / block, block], as [N, K]
    gate, up, down = (_part(apart, prefix + f"shared_experts.{p}_proj.weight_q8") for p in ("gate", "up", "down"))
    gate, up, down = (w.reshape(len(w), -1) for w in (gate, up, down))
    scales = folded[prefix + "experts.down_proj.weight_with_shared_q8_scales"]
    down_scales = _part(apart, prefix + "shared_experts.down_proj.weight_q8_scales")
    per = ff // BLOCK
    for i in range(SHARED):  # shared expert i: units i ff .. (i + 1) ff, gate rows interleaved with up
        np.testing.assert_array_equal(fc1[experts + i, 0::2], gate[i * ff : (i + 1) * ff])
        np.testing.assert_array_equal(fc1[experts + i, 1::2], up[i * ff : (i + 1) * ff])
        np.testing.assert_array_equal(fc2[experts + i], down[:, i * ff : (i + 1) * ff])
        want = down_scales[:, i * per : (i + 1) * per]  # float32 there, the kernel's float16 here
        np.testing.assert_allclose(scales[experts + i].astype(np.float32), want, rtol=2**-10)


def test_the_folded_8bit_graph_computes_what_the_matmul_nbits_did(folders: dict[str, Path]) -> None:
    folded, apart, full = (_logits(folders[name]) for name in ("folded", "apart", "float"))
    scale = full.abs().max()
    assert (folded - apart).abs().max() <= FOLDED_VS_APART * scale
    assert torch.equal(folded.argmax(-1), apart.argmax(-1))
    for eight in (folded, apart):
        assert (eight - full).abs().max() <= EIGHT_BIT_VS_FLOAT * scale


def test_float32_8bit_graphs_keep_the_shared_mlp_as_matmul_nbits(folders: dict[str, Path]) -> None:
    """Their QMoE runs on the CPU (onnxruntime registers it on CUDA for 16 bits only): no fold there."""
    graph = onnx.load(str(folders["fp32"] / "decode.onnx")).graph
    nbits = {n.input[1] for n in graph.node if n.op_type == "MatMulNBits"}
    assert [name for name in nbits if "shared_experts" in name]
    ks = {next(a.i for a in n.attribute if a.name == "k") for n in graph.node if n.op_type == "QMoE"}
    assert ks == {mini_config().num_experts_per_tok}


def test_experts_only_folds_the_shared_experts_without_matmul_nbits(folders: dict[str, Path]) -> None:
    """`--weights-8bit-scope experts` on a bf16 export: QMoE holds the shared experts (MatMulNBitsPass never
    ran), the linears stay MatMuls, and the numbers are those of the full 8-bit graph's experts."""
    graph = onnx.load(str(folders["experts"] / "decode.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "MatMulNBits"]
    ks = {next(a.i for a in n.attribute if a.name == "k") for n in graph.node if n.op_type == "QMoE"}
    assert ks == {mini_config().num_experts_per_tok + SHARED}
    assert not [t.name for t in graph.initializer if "shared_experts" in t.name]
    experts, full = _initializers(folders["experts"]), _initializers(folders["folded"])
    name = "model.layers.1.mlp.experts.gate_up_proj.weight_with_shared_q8"
    np.testing.assert_array_equal(experts[name], full[name])
    assert (_logits(folders["experts"]) - _logits(folders["float"])).abs().max() <= EIGHT_BIT_VS_FLOAT * _logits(
        folders["float"]
    ).abs().max()
