"""The ort lowering of a 16-bit export runs DeepSeekMoE's shared experts inside com.microsoft::MoE: n more
experts of the routed width, always chosen at weight 1 (passes/shared_experts.py). A float32 export keeps
them as MatMuls (onnxruntime's float32 MoE kernel is a slow SIMT GEMM on the GPU)."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
import torch
from dsv3c.passes.lower import lower_folder
from dsv3c.passes.pipelines import Target

from .fixtures.exports import greedy_logits as _logits
from .fixtures.exports import mini_config, shared_expert_exports

SHARED = 2  # two shared experts: the shared MLP is twice the routed width, split in two experts


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shared-experts")
    return {**shared_expert_exports(root, SHARED, seed=3, dtypes=("bf16", "fp32")), "root": root}


def _moes(folder: Path) -> list[ir.Node]:
    graph = ir.load(folder / "decode.onnx").graph
    return [n for n in graph if n.domain == "com.microsoft" and n.op_type == "MoE"]


def _lower(export: Path, out: Path, shared_experts_in_moe: bool = True) -> Path:
    folder = lower_folder(export, out, Target.ORT, shared_experts_in_moe=shared_experts_in_moe).folder
    assert folder is not None
    return folder


def test_shared_experts_become_experts_of_the_moe_in_bf16(exports: dict[str, Path], tmp_path: Path) -> None:
    config = mini_config(n_shared_experts=SHARED)
    canonical = ir.load(exports["bf16"] / "decode.onnx").graph.initializers
    folder = _lower(exports["bf16"], tmp_path / "ort")
    graph = ir.load(folder / "decode.onnx").graph
    assert not [name for name in graph.initializers if "shared_experts" in name]
    moes = _moes(folder)
    assert len(moes) == config.num_hidden_layers - config.first_k_dense_replace
    ff, experts = config.moe_intermediate_size, config.n_routed_experts
    for moe in moes:
        assert moe.attributes["k"].as_int() == config.num_experts_per_tok + SHARED
        fc1, fc2 = moe.inputs[2], moe.inputs[4]
        assert fc1 is not None and fc2 is not None and fc1.name is not None
        prefix = fc1.name.split("experts.gate_up_proj")[0]
        gate = canonical[prefix + "shared_experts.gate_proj.weight"].const_value.numpy()  # type: ignore[union-attr]
        down = canonical[prefix + "shared_experts.down_proj.weight"].const_value.numpy()  # type: ignore[union-attr]
        got1, got2 = fc1.const_value.numpy(), fc2.const_value.numpy()  # type: ignore[union-attr]
        assert got1.shape == (experts + SHARED, 2 * ff, config.hidden_size)
        for i in range(SHARED):  # shared expert i: units i ff .. (i + 1) ff, gate rows interleaved with up
            want_gate = gate[i * ff : (i + 1) * ff].astype(np.float16)
            np.testing.assert_array_equal(got1[experts + i, 0::2], want_gate)
            np.testing.assert_array_equal(got2[experts + i], down[:, i * ff : (i + 1) * ff].astype(np.float16))
        assert gate.dtype == ml_dtypes.bfloat16


def test_bf16_logits_stay_those_of_the_shared_mlp_as_matmuls(exports: dict[str, Path], tmp_path: Path) -> None:
    """The same function as the shared MLP as MatMuls: on the CPU provider a bf16 graph computes in float32
    (runtime/float_compute.py), so the two lowerings agree to float32 rounding (measured 3e-7 of the
    largest logit) and the greedy tokens are the same. On the GPU the shared experts run in the kernel's
    float16 instead of bf16 MatMuls: float16 keeps more mantissa bits than bf16, in a smaller range."""
    folded = _logits(_lower(exports["bf16"], tmp_path / "folded"))
    apart = _logits(_lower(exports["bf16"], tmp_path / "apart", shared_experts_in_moe=False))
    assert torch.equal(folded.argmax(-1), apart.argmax(-1))
    assert (folded - apart).abs().max() <= 1e-5 * apart.abs().max()


def test_the_mtp_graph_folds_them_too_and_computes_the_same(exports: dict[str, Path], tmp_path: Path) -> None:
    """The MTP module's MoE has shared experts as well: folded, its graph gives what the MatMuls gave."""
    from dsv3c.artifact.manifest import read_manifest
    from dsv3c.onnxkit.session import SessionSetup, open_session
    from dsv3c.runtime.float_compute import compute_in_float32

    outputs = []
    for name, fold in (("folded", True), ("apart", False)):
        folder = _lower(exports["bf16"], tmp_path / name, fold)
        model = ir.load(folder / read_manifest(folder).graph_path("mtp").name)
        ks = {n.attributes["k"].as_int() for n in model.graph if n.op_type == "MoE"}
        assert ks == {mini_config().num_experts_per_tok + (SHARED if fold else 0)}
        compute_in_float32(model)  # the CPU provider has no bf16 MatMul
        session = open_session(model_bytes(model), SessionSetup(weights_folder=folder))
        rng = np.random.default_rng(0)
        feeds = {}
        for i in session.get_inputs():
            shape = [d if isinstance(d, int) else 3 for d in i.shape]
            if "past" in i.name:
                shape[1] = 7  # room for the three new tokens at their positions (up to 6): the graph writes there
            if i.type == "tensor(int64)":
                feeds[i.name] = (np.arange(int(np.prod(shape))) % 7).reshape(shape)
            else:
                feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        outputs.append(session.run(None, feeds)[0].astype(np.float32))
    folded, apart = outputs
    assert np.abs(folded - apart).max() <= 1e-5 * np.abs(apart).max()


def model_bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def test_the_bytes_a_step_reads_do_not_change(exports: dict[str, Path], tmp_path: Path) -> None:
    """The benchmarks' floor counts the shared experts stacked in the MoE as read at every step."""
    from dsv3c.artifact.manifest import read_manifest
    from dsv3c.runtime.bench.memory import graph_weight_bytes

    folded = graph_weight_bytes(read_manifest(_lower(exports["bf16"], tmp_path / "folded")))
    apart = graph_weight_bytes(read_manifest(_lower(exports["bf16"], tmp_path / "apart", False)))
    assert [folded(t) for t in (1, 2, 8)] == [apart(t) for t in (1, 2, 8)]


def test_float32_exports_keep_the_shared_mlp(exports: dict[str, Path], tmp_path: Path) -> None:
    config = mini_config(n_shared_experts=SHARED)
    folder = _lower(exports["fp32"], tmp_path / "ort32")
    graph = ir.load(folder / "decode.onnx").graph
    assert [name for name in graph.initializers if "shared_experts" in name]
    assert all(moe.attributes["k"].as_int() == config.num_experts_per_tok for moe in _moes(folder))


def test_shared_experts_apart_is_for_the_ort_target(
    exports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dsv3c.cli import main as cli

    out = tmp_path / "p"
    args = ["lower", str(exports["bf16"]), "--target", "portable", "--shared-experts-apart", "--out", str(out)]
    assert cli.main(args) == 2
    assert "--shared-experts-apart" in capsys.readouterr().err and not out.exists()
