"""The custom ops alone: their reference functions in onnxruntime against the torch ops (the model's code)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dsv3c.export import custom_ops
from dsv3c.export.functions import attach_functions
from dsv3c.export.graphs import CausalLMGraph
from dsv3c.export.onnx_ops import DOMAIN, register_schemas
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM
from onnx import TensorProto, helper

OPSET = 21


def run_nodes(nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray], outputs: dict[str, int]) -> list[np.ndarray]:
    """One graph of dsv3c nodes with their functions attached, run by onnxruntime; outputs: name -> rank."""
    inputs = [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
        for k, v in feeds.items()
    ]
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank) for name, rank in outputs.items()]
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outs),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        ir_version=10,
    )
    attach_functions(model)
    register_schemas()
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(list(outputs), feeds)


MOE_CASES = {  # (scoring_func, topk_method, n_group, topk_group, norm_topk_prob, top_k)
    "v3": ("sigmoid", "noaux_tc", 4, 2, True, 2),
    "v2_lite": ("softmax", "greedy", 1, 1, False, 2),
    "v2_grouped": ("softmax", "group_limited_greedy", 4, 2, True, 3),
    "no_norm_top1": ("sigmoid", "noaux_tc", 2, 1, True, 1),
}


def moe_case(name: str, out: str, seed: int) -> tuple[onnx.NodeProto, dict[str, np.ndarray], np.ndarray]:
    scoring, method, groups, topk_group, norm, top_k = MOE_CASES[name]
    g = torch.Generator().manual_seed(seed)
    n, d, e, ff = 11, 24, 8, 16
    x, router = torch.randn(n, d, generator=g), torch.randn(e, d, generator=g) * 0.5
    bias = torch.randn(e, generator=g) * 0.3 if method == "noaux_tc" else None
    gate, up, down = (torch.randn(e, *s, generator=g) * 0.2 for s in ((ff, d), (ff, d), (d, ff)))
    expected = custom_ops.moe(x, router, bias, gate, up, down, top_k, groups, topk_group, 2.5, norm, scoring, method)
    feeds = {f"{out}_x": x, f"{out}_router": router, f"{out}_gate": gate, f"{out}_up": up, f"{out}_down": down}
    if bias is not None:
        feeds[f"{out}_bias"] = bias
    node = helper.make_node(
        "MoE",
        [
            f"{out}_x",
            f"{out}_router",
            f"{out}_bias" if bias is not None else "",
            f"{out}_gate",
            f"{out}_up",
            f"{out}_down",
        ],
        [out],
        domain=DOMAIN,
        top_k=top_k,
        n_group=groups,
        topk_group=topk_group,
        routed_scaling_factor=2.5,
        norm_topk_prob=int(norm),
        scoring_func=scoring,
        topk_method=method,
    )
    return node, {k: v.numpy() for k, v in feeds.items()}, expected.numpy()


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_function_matches_torch_op(case: str) -> None:
    node, feeds, expected = moe_case(case, "y", seed=1)
    (got,) = run_nodes([node], feeds, {"y": 2})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_two_variants_in_one_graph_get_overloads() -> None:
    a, feeds_a, expected_a = moe_case("v3", "a", seed=2)
    b, feeds_b, expected_b = moe_case("v2_lite", "b", seed=3)
    got_a, got_b = run_nodes([a, b], {**feeds_a, **feeds_b}, {"a": 2, "b": 2})
    np.testing.assert_allclose(got_a, expected_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_b, expected_b, rtol=1e-5, atol=1e-5)


def mla_case(absorbed: bool, seed: int) -> tuple[onnx.NodeProto, dict[str, np.ndarray], np.ndarray]:
    """Three rows with 0, 2 and 5 valid past entries in a buffer of 5, and 3 new tokens each."""
    g = torch.Generator().manual_seed(seed)
    b, s, p, h, nope, rope, v, r = 3, 3, 5, 4, 8, 6, 10, 12
    positions = torch.tensor([[0, 1, 2], [2, 3, 4], [5, 6, 7]])
    q_nope, q_pe = torch.randn(b, s, h, nope, generator=g), torch.randn(b, s, h, rope, generator=g)
    ckv, kpe = torch.randn(b, p + s, r, generator=g), torch.randn(b, p + s, rope, generator=g)
    wkv_b = torch.randn(h * (nope + v), r, generator=g) * 0.3
    scale = (nope + rope) ** -0.5
    expected = custom_ops.mla_attention(q_nope, q_pe, ckv, kpe, wkv_b, positions, h, nope, rope, v, r, scale, absorbed)
    names = ["q_nope", "q_pe", "ckv", "kpe", "wkv_b", "positions"]
    node = helper.make_node(
        "MLAAttention",
        names,
        ["y"],
        domain=DOMAIN,
        num_heads=h,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=v,
        kv_lora_rank=r,
        softmax_scale=scale,
        absorbed=int(absorbed),
    )
    tensors = (q_nope, q_pe, ckv, kpe, wkv_b, positions)
    return node, {k: t.numpy() for k, t in zip(names, tensors, strict=True)}, expected.numpy()


@pytest.mark.parametrize("absorbed", [False, True])
def test_mla_function_matches_torch_op_over_ragged_past(absorbed: bool) -> None:
    node, feeds, expected = mla_case(absorbed, seed=4)
    (got,) = run_nodes([node], feeds, {"y": 3})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_visibility_mask_follows_positions() -> None:
    mask = custom_ops.visibility_mask(torch.tensor([[2, 3], [0, 1]]), total=5)  # 3 past slots, 2 new
    assert mask[0].tolist() == [[True, True, False, True, False], [True, True, False, True, True]]
    assert mask[1].tolist() == [[False, False, False, True, False], [False, False, False, True, True]]


@torch.no_grad()
@pytest.mark.parametrize("absorbed", [False, True])
def test_export_modules_run_eagerly_like_the_model(tiny_model: DeepseekV3ForCausalLM, absorbed: bool) -> None:
    """The wiring the graphs are traced from equals the model's forward (no ONNX involved)."""
    ids = torch.randint(0, 512, (2, 9))
    ref = tiny_model(ids)
    graph = CausalLMGraph(tiny_model, absorbed=absorbed)
    past = [(c.ckv[:, :6], c.kpe[:, :6]) for c in ref.new_cache]
    out = graph(ids[:, 6:], torch.arange(6, 9).expand(2, 3), past)
    torch.testing.assert_close(out[0], ref.logits[:, 6:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[2], ref.new_cache[0].ckv[:, 6:])


def test_absorbed_attention_reads_the_latent_cache_in_one_gemm_per_row() -> None:
    """Every MatMul over the cache (ckv, kpe, or views of them) has 3-D operands, heads folded into the rows:
    a head axis broadcast over the cache makes H GEMMs that each read all of it (3.3x slower at 16k on CPU)."""
    from dsv3c.export.functions import mla_function

    function = mla_function(True, OPSET)
    producer = {out: node for node in function.node for out in node.output}

    def from_cache(name: str) -> bool:
        node = producer.get(name)
        passing = ("Transpose", "Unsqueeze")  # views of the cache, not another operand
        return name in ("ckv", "kpe") or (node is not None and node.op_type in passing and from_cache(node.input[0]))

    over_cache = [n for n in function.node if n.op_type == "MatMul" and any(from_cache(i) for i in n.input)]
    assert len(over_cache) == 3  # scores (latent, rope) and the weighted sum
    for node in over_cache:
        other = next(i for i in node.input if not from_cache(i))
        assert producer[other].op_type == "Reshape", f"{node.name or node.output[0]} broadcasts over the heads"
