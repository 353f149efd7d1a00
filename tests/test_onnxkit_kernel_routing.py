"""A CUDA session's move of QMoE's plain softmax routing from the graph into the kernel
(onnxkit/kernel_routing.py): the same logits, checked on the CPU through com.microsoft::MoE, whose CPU kernel
honors normalize_routing_weights=0 (QMoE's does not, which is why the folder keeps the graph's routing)."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
import torch
from dsv3c.onnxkit.kernel_routing import qmoe_routing_in_kernel
from dsv3c.onnxkit.session import GRAPH_ROUTED_QMOE, UNPACKED_QMOE, SessionSetup, _for_cuda_qmoe, cuda_qmoe_nodes

from .fixtures.exports import V2_ROUTING, greedy_logits, lower_ort, mini_config

ROLES = ("prefill", "decode")


def _export(root: Path, dtype: str, **routing: object) -> Path:
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder
    from dsv3c.models.checkpoint import init_random, save_model

    save_model(init_random(mini_config(**routing), seed=7), root / "ckpt", dtype=dtype)
    export(from_folder(root / "ckpt"), root / "export", weights="checkpoint", dtype=dtype)
    return root / "export"


@pytest.fixture(scope="module", params=["bf16", "fp32"])
def graph_routed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A V2-routed model lowered with MoE's routing kept in the graph, as QMoE's is: bf16 has its shared
    experts in the kernel (columns of ones), float32 keeps them apart (a row of zeros). The CPU runtime
    computes the bf16 graph's MoE in float32, whose kernel honors normalize_routing_weights=0."""
    root = tmp_path_factory.mktemp(f"kernel-routing-{request.param}")
    export = _export(root, request.param, **V2_ROUTING)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("dsv3c.passes.moe_router_inputs.RENORMALIZES_ALWAYS", frozenset({"QMoE", "MoE"}))
        return lower_ort(export, root / "ort")


def _moes(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def test_the_kernel_routing_gives_the_graph_routings_logits(graph_routed: Path, tmp_path: Path) -> None:
    rewritten = tmp_path / "kernel-routed"
    shutil.copytree(graph_routed, rewritten)
    layers = mini_config(**V2_ROUTING)
    moe_layers = layers.num_hidden_layers - layers.first_k_dense_replace
    for role in ROLES:
        model = onnx.load(graph_routed / f"{role}.onnx", load_external_data=False)
        assert {n.op_type for n in model.graph.node} >= {"TopK", "ReduceSum"}  # the graph routes
        assert qmoe_routing_in_kernel(model, ops=("MoE",)) == moe_layers
        assert not {"TopK", "ReduceSum", "Log"} & {n.op_type for n in model.graph.node}
        for moe in _moes(model, "MoE"):
            assert next(a.i for a in moe.attribute if a.name == "normalize_routing_weights") == 0
        onnx.save(model, rewritten / f"{role}.onnx")
    want, got = greedy_logits(graph_routed, steps=3), greedy_logits(rewritten, steps=3)
    assert torch.equal(want.argmax(-1), got.argmax(-1))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_only_plain_softmax_routing_of_16_bit_qmoe_moves(tmp_path: Path) -> None:
    """V2's routing in a bf16 8-bit lowering moves (every QMoE layer, all of them CUDA's); V3's sigmoid
    routing with a selection bias and groups stays, and a float32 QMoE (CPU's) is not CUDA's."""
    v2 = lower_ort(_export(tmp_path / "v2", "bf16", **V2_ROUTING), tmp_path / "v2" / "ort", weights_8bit=32)
    model = onnx.load(v2 / "decode.onnx", load_external_data=False)
    qmoes = _moes(model, "QMoE")
    assert qmoes and len(cuda_qmoe_nodes(model.graph)) == len(qmoes)
    assert qmoe_routing_in_kernel(model, nodes={n.name for n in cuda_qmoe_nodes(model.graph)}) == len(qmoes)
    v3 = lower_ort(_export(tmp_path / "v3", "bf16"), tmp_path / "v3" / "ort", weights_8bit=32)
    assert qmoe_routing_in_kernel(onnx.load(v3 / "decode.onnx", load_external_data=False)) == 0
    f32 = lower_ort(_export(tmp_path / "f32", "fp32", **V2_ROUTING), tmp_path / "f32" / "ort", weights_8bit=32)
    assert not cuda_qmoe_nodes(onnx.load(f32 / "decode.onnx", load_external_data=False).graph)


@pytest.mark.parametrize("switch", ["", GRAPH_ROUTED_QMOE, UNPACKED_QMOE])
def test_a_cuda_session_routes_in_the_kernel_unless_told_not_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, switch: str
) -> None:
    """The graph a CUDA session gets (onnxruntime is not asked for the CUDA provider here): the kernel's routing
    and packed weights by default; DSV3C_GRAPH_ROUTED_QMOE=1 keeps the graph's routing, DSV3C_UNPACKED_QMOE=1
    the rows as stored, each leaving the other as it is."""
    config = {**V2_ROUTING, "hidden_size": 128, "moe_intermediate_size": 128, "n_routed_experts": 8}
    v2 = lower_ort(_export(tmp_path, "bf16", **config), tmp_path / "ort", weights_8bit=32)
    for name in (GRAPH_ROUTED_QMOE, UNPACKED_QMOE):
        monkeypatch.setenv(name, "1" if name == switch else "0")
    graph, _, packed = _for_cuda_qmoe(v2 / "decode.onnx", SessionSetup(device="cuda"), None)
    model = onnx.load(graph, load_external_data=False) if isinstance(graph, Path) else onnx.load_from_string(graph)
    assert ("TopK" in {n.op_type for n in model.graph.node}) == (switch == GRAPH_ROUTED_QMOE)
    assert bool(packed) == (switch != UNPACKED_QMOE)
