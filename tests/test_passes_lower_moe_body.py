"""The sparse MoE body: both expert sets against the torch op, and the weights a decode step gathers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from dsv3c.export import custom_ops
from dsv3c.export.functions import ExpertSet, attach_functions
from dsv3c.export.onnx_ops import DOMAIN, register_schemas
from dsv3c.passes.inline import InlineCustomPass
from dsv3c.passes.lower_moe_body import MoEBodyPass
from onnx import TensorProto, helper

E, TOP_K, D, FF = 8, 2, 24, 16


def _case(tokens: int, seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    x, router = torch.randn(tokens, D, generator=g), torch.randn(E, D, generator=g) * 0.5
    bias = torch.randn(E, generator=g) * 0.3
    gate, up, down = (torch.randn(E, *s, generator=g) * 0.2 for s in ((FF, D), (FF, D), (D, FF)))
    want = custom_ops.moe(x, router, bias, gate, up, down, TOP_K, 4, 2, 2.5, True, "sigmoid", "noaux_tc")
    feeds = {"x": x, "router": router, "bias": bias, "gate": gate, "up": up, "down": down}
    node = helper.make_node(
        "MoE",
        list(feeds),
        ["y"],
        domain=DOMAIN,
        top_k=TOP_K,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=1,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
    )
    inputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in feeds.items()]
    model = helper.make_model(
        helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, D])]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)],
        ir_version=10,
    )
    attach_functions(model)
    return model, {k: v.numpy() for k, v in feeds.items()}, want.numpy()


def _with(model: onnx.ModelProto, expert_set: ExpertSet) -> onnx.ModelProto:
    m = ir.serde.deserialize_model(model)
    MoEBodyPass(expert_set)(m)
    return ir.serde.serialize_model(m)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], extra: list[str] = ()) -> list[np.ndarray]:  # type: ignore[assignment]
    register_schemas()
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y", *extra], feeds)


@pytest.mark.parametrize("expert_set", list(ExpertSet))
@pytest.mark.parametrize("tokens", [1, 3, 40])  # decode (U = k), a small batch, a prefill (U = E)
def test_sparse_body_matches_torch(expert_set: ExpertSet, tokens: int) -> None:
    model, feeds, want = _case(tokens, seed=tokens)
    (got,) = _run(_with(model, expert_set), feeds)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _gathered_experts(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """Run the body inlined, with the gathered gate weights as an extra output: how many experts it read."""
    m = ir.serde.deserialize_model(model)
    InlineCustomPass()(m)
    gathers = [n for n in m.graph if n.op_type == "Gather" and n.inputs[0] is not None and n.inputs[0].name == "gate"]
    assert len(gathers) == 1
    gathered_value = gathers[0].outputs[0]
    gathered_value.type = ir.TensorType(ir.DataType.FLOAT)
    gathered_value.shape = ir.Shape([None, FF, D])
    m.graph.outputs.append(gathered_value)
    proto = ir.serde.serialize_model(m)
    _, gathered = _run(proto, feeds, [gathers[0].outputs[0].name])
    return int(gathered.shape[0])


@pytest.mark.parametrize("expert_set", list(ExpertSet))
def test_decode_reads_exactly_the_top_k_experts(expert_set: ExpertSet) -> None:
    model, feeds, _ = _case(1, seed=5)
    assert _gathered_experts(_with(model, expert_set), feeds) == TOP_K
    model, feeds, _ = _case(3, seed=6)
    chosen = _gathered_experts(_with(model, ExpertSet.CHOSEN), feeds)
    assert TOP_K <= chosen <= min(E, 3 * TOP_K)
    assert _gathered_experts(_with(model, ExpertSet.TOP), feeds) == min(E, 3 * TOP_K)


def test_no_matmul_reads_every_expert() -> None:
    """The body's MatMuls take gathered experts, never the whole [E, out, in] weight tensors."""
    model, _, _ = _case(1, seed=7)
    (function,) = [f for f in model.functions if f.name == "MoE"]
    matmul_inputs = {i for n in function.node if n.op_type == "MatMul" for i in n.input}
    assert not matmul_inputs & {"gate", "up", "down"}
    assert sum(n.op_type == "Gather" for n in function.node) >= 3


def test_ort_lowering_of_a_bf16_moe_runs_the_kernel_in_float16() -> None:
    """onnxruntime has no bf16 com.microsoft::MoE kernel: the lowering casts its inputs to float16 and its
    output back; on the CPU provider the runtime then computes it in float32 (runtime/float_compute.py)."""
    from dsv3c.passes.lower_ort import LowerMoEToOrtPass
    from dsv3c.runtime.float_compute import compute_in_float32

    model, feeds, want = _case(5, seed=8)
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    m = ir.serde.deserialize_model(model)
    LowerMoEToOrtPass()(m)
    (moe,) = [n for n in m.graph if n.domain == "com.microsoft"]
    for index in (0, 1, 2, 4):
        producer = moe.inputs[index].producer()  # type: ignore[union-attr]
        assert producer is not None and producer.op_type == "Cast"
        assert producer.attributes["to"].as_int() == ir.DataType.FLOAT16
    (user, _), *_ = moe.outputs[0].uses()
    assert user.op_type == "Cast" and user.attributes["to"].as_int() == ir.DataType.BFLOAT16
    compute_in_float32(m)
    session = ort.InferenceSession(ir.serde.serialize_model(m).SerializeToString(), providers=["CPUExecutionProvider"])
    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in feeds.items()}
    (got,) = session.run(["y"], bf16)
    np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2)
