"""DeepSeek-V2's softmax routing run inside com.microsoft::MoE / QMoE (passes/moe_router_inputs.py).

The pass relies on the kernels' routing: softmax over all experts, top k, renormalized only when asked.
That contract is checked on onnxruntime's CPU kernels here (bench/gpu_moe_routing.py checks the CUDA ones; the CPU QMoE
renormalizes whatever it is told, which keeps V2-Lite's routing in the graph for QMoE);
then the lowering with the routing in the kernel is checked against the same lowering with it in the
graph, for float and 8-bit experts, with shared experts and a routed_scaling_factor that is not 1.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest
import torch
from dsv3c.onnxkit.session import open_session
from dsv3c.passes import lower_ort, lower_ort_8bit, moe_router_inputs
from dsv3c.passes.moe_kernel_contract import routing_case
from dsv3c.passes.moe_router_inputs import kernel_factor
from onnx import helper

from .fixtures.exports import greedy_logits, mini_config
from .fixtures.exports import lower_ort as lower_ort_folder


def _kernel(normalize: int, dtype: str, op: str = "MoE") -> float:
    case = routing_case(op, normalize, dtype)
    return case.error(open_session(case.model).run(None, case.feeds)[0])


@pytest.mark.parametrize("normalize", [0, 1])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_kernel_mixes_with_the_softmax_over_all_experts(normalize: int, dtype: str) -> None:
    assert _kernel(normalize, dtype) < (1e-5 if dtype == "float32" else 5e-3)


def _moe(**attrs: object) -> ir.Node:
    defaults = {"scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1}
    defaults |= {"norm_topk_prob": 0, "routed_scaling_factor": 1.0, "top_k": 2}
    defaults |= attrs
    bias = ["bias"] if defaults.pop("bias", False) else [""]
    node = helper.make_node("MoE", ["x", "router", *bias, "g", "u", "d"], ["y"], domain="dsv3c", **defaults)
    return ir.serde.deserialize_node(node)


@pytest.mark.parametrize(
    ("attrs", "shared", "factor"),
    [
        ({}, 2, 3.0),  # V2-Lite: s = 1, 2 shared experts in the kernel
        ({}, 0, 1.0),
        ({"routed_scaling_factor": 0.5}, 2, 2.5),
        ({"routed_scaling_factor": 16.0}, 0, 16.0),
        ({"routed_scaling_factor": 16.0}, 2, None),  # a shared 0 would not outrank log(16 p)
        ({"norm_topk_prob": 1, "routed_scaling_factor": 2.5}, 0, 2.5),  # the kernel renormalizes
        ({"norm_topk_prob": 1}, 2, None),  # the sum would count the shared experts
        ({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}, 0, None),
        ({"scoring_func": "sigmoid", "topk_method": "noaux_tc", "bias": True}, 0, None),  # DeepSeek-V3
    ],
)
def test_which_routings_run_in_the_kernel(attrs: dict[str, object], shared: int, factor: float | None) -> None:
    assert kernel_factor(_moe(**attrs), shared) == factor


V2_SCALED = {
    "scoring_func": "softmax",
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 0.5,
    "norm_topk_prob": False,
    "n_shared_experts": 2,
}
MODELS = {"v2-scaled": V2_SCALED, "normalized": V2_SCALED | {"norm_topk_prob": True, "routed_scaling_factor": 2.5}}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder
    from dsv3c.models.checkpoint import init_random, save_model

    root = tmp_path_factory.mktemp("kernel-routing")
    for name, overrides in MODELS.items():
        save_model(init_random(mini_config(**overrides), seed=7), root / name / "ckpt", dtype="bf16")
        export(from_folder(root / name / "ckpt"), root / name / "export", weights="checkpoint", dtype="bf16")
    return {name: root / name / "export" for name in MODELS}


@pytest.mark.parametrize(
    ("model", "options", "op"),
    [
        ("v2-scaled", {}, "MoE"),  # 2 shared experts in the kernel: factor 2.5, in the down weights
        ("v2-scaled", {"shared_experts_in_moe": False}, "MoE"),  # the logits as they are, factor 0.5
        ("normalized", {"shared_experts_in_moe": False, "weights_8bit": 128}, "QMoE"),  # factor 2.5, in the scales
    ],
)
def test_routing_in_the_kernel_computes_what_the_graph_routing_computes(
    model: str,
    options: dict[str, object],
    op: str,
    exports: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bf16 graphs (the experts in the float16 kernels): the greedy tokens agree, the logits differ by
    float16 rounding, and the float lowering stays as close to the export as with the graph's routing."""
    kernel = lower_ort_folder(exports[model], tmp_path / "kernel", **options)
    for module in (lower_ort, lower_ort_8bit, moe_router_inputs):
        monkeypatch.setattr(module, "kernel_factor", lambda *args: None)
    in_graph = lower_ort_folder(exports[model], tmp_path / "graph", **options)
    graph = ir.load(kernel / "decode.onnx").graph
    normalize = int(MODELS[model]["norm_topk_prob"])  # type: ignore[call-overload]
    moes = [n for n in graph if n.op_type == op]
    assert moes and all(n.attributes["normalize_routing_weights"].as_int() == normalize for n in moes)
    assert not [n for n in graph if n.op_type in ("TopK", "ReduceSum")]
    assert [n for n in ir.load(in_graph / "decode.onnx").graph if n.op_type == "TopK"]
    want, got = greedy_logits(in_graph, steps=3), greedy_logits(kernel, steps=3)
    assert torch.equal(want.argmax(-1), got.argmax(-1))
    assert (want - got).abs().max() <= 2e-3 * want.abs().max()
    if op == "MoE":
        reference = greedy_logits(exports[model], steps=3)
        assert (reference - got).abs().max() <= 2e-4 * reference.abs().max()


def test_qmoe_renormalizes_whatever_it_is_told() -> None:
    """Why QMoE takes the routing in the kernel only for norm_topk_prob models (RENORMALIZES_ALWAYS)."""
    assert "QMoE" in moe_router_inputs.RENORMALIZES_ALWAYS
    assert _kernel(0, "float32", "QMoE") > 0.1 and _kernel(1, "float32", "QMoE") < 3e-2
