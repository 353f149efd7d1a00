"""The ort lowering's cuts of a decode step's kernels compute what the export computes.

Each cut removes nodes onnxruntime ran in every layer of every step (bench/gpu_step_kernels.py on the
H200): one attention mask for all layers (passes/shared_shapes.py), kv_b_proj per head and the router in
float32 stored as they are read (ort_split_past.py, transposed_weights.py), MatMuls of one activation
merged (merged_matmuls.py), softmax routing run by the MoE kernel itself (moe_router_inputs.py) and no
multiplication by a routed_scaling_factor of 1 (multiply_by_one.py). The model here routes as V2-Lite
does: softmax, greedy, factor 1, 2 shared experts, bf16.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from dsv3c.passes.multiply_by_one import MultiplyByOnePass
from dsv3c.passes.shared_shapes import SharedInputShapesPass
from onnx import TensorProto, helper

from .fixtures.exports import V2_ROUTING, greedy_logits, lower_ort, mini_config


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder
    from dsv3c.models.checkpoint import init_random, save_model

    root = tmp_path_factory.mktemp("kernel-cuts")
    save_model(init_random(mini_config(**V2_ROUTING), seed=5), root / "ckpt", dtype="bf16")
    export(from_folder(root / "ckpt"), root / "export", weights="checkpoint", dtype="bf16")
    return {"export": root / "export", "ort": lower_ort(root / "export", root / "ort")}


def _graph(folder: Path, role: str = "decode") -> ir.Graph:
    return ir.load(folder / f"{role}.onnx").graph


def _ops(graph: ir.Graph, op: str) -> list[ir.Node]:
    return [n for n in graph if n.op_type == op]


def test_the_lowering_computes_what_the_export_computes(folders: dict[str, Path]) -> None:
    """Prefill, then decode steps that read the cache: the same greedy tokens, and logits within float16's
    rounding: the lowering runs the experts in com.microsoft::MoE's float16 (measured 5.7e-5 of the largest
    logit, bit for bit what the lowering gave before these cuts, at 270d4d0). A wrong mask or per-head
    layout moves the logits by their own size."""
    export, lowered = (greedy_logits(folders[name], steps=3) for name in ("export", "ort"))
    assert torch.equal(export.argmax(-1), lowered.argmax(-1))
    assert (export - lowered).abs().max() <= 2e-4 * export.abs().max()


def test_one_attention_mask_serves_every_layer(folders: dict[str, Path]) -> None:
    graph = _graph(folders["ort"])
    layers = mini_config().num_hidden_layers
    assert len(_ops(_graph(folders["export"]), "MLAAttention")) == layers
    assert len(_ops(graph, "LessOrEqual")) == 1  # the slots at or below the position, one per step
    assert len(_ops(graph, "Where")) == layers  # each layer masks its own scores with it


def test_no_weight_is_split_or_cast_at_every_step(folders: dict[str, Path]) -> None:
    """kv_b_proj is stored per head (w_uk, and w_uv already transposed), the router in float32, transposed."""
    export, graph = _graph(folders["export"]), _graph(folders["ort"])
    for node in graph:
        if node.op_type in ("Split", "Cast", "Transpose", "Reshape"):
            assert not (node.inputs[0] is not None and node.inputs[0].is_initializer()), node.name
    config = mini_config(**V2_ROUTING)
    heads, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    for layer in range(config.num_hidden_layers):
        name = f"model.layers.{layer}.self_attn.kv_b_proj.weight"
        kv_b = export.initializers[name].const_value.numpy()  # type: ignore[union-attr]
        per_head = kv_b.reshape(heads, nope + v, -1)
        uk, uv = (graph.initializers[f"{name}.{p}"].const_value.numpy() for p in ("uk", "uv"))  # type: ignore[union-attr]
        np.testing.assert_array_equal(uk, per_head[:, :nope])
        np.testing.assert_array_equal(uv, per_head[:, nope:].transpose(0, 2, 1))
    router = [n for n in graph.initializers if n.endswith("mlp.gate.weight_t_float")]
    assert len(router) == config.num_hidden_layers - config.first_k_dense_replace
    for name in router:
        stored = graph.initializers[name].const_value.numpy()  # type: ignore[union-attr]
        original = export.initializers[name.removesuffix("_t_float")].const_value.numpy()  # type: ignore[union-attr]
        assert stored.dtype == np.float32 and original.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(stored, original.astype(np.float32).T)


def test_the_projections_of_one_hidden_state_are_one_matmul(folders: dict[str, Path]) -> None:
    """q and kv_a (MLA), gate and up (the dense MLP): one MatMul each, whose Split also splits kv_a."""
    graph = _graph(folders["ort"])
    merged = [n for n in graph if n.op_type == "MatMul" and n.inputs[1] is not None and "+" in (n.inputs[1].name or "")]
    config = mini_config()
    assert len(merged) == config.num_hidden_layers + config.first_k_dense_replace
    for node in merged:
        (split,) = (u.node for u in node.outputs[0].uses())
        assert split.op_type == "Split"
        parts = (node.inputs[1].name or "").split("+")  # type: ignore[union-attr]
        assert len(split.outputs) == (3 if "kv_a_proj" in parts[-1] else 2)  # q, latent, RoPE key


def test_softmax_routing_runs_in_the_kernel_and_keeps_no_multiplication_by_one(folders: dict[str, Path]) -> None:
    graph = _graph(folders["ort"])
    assert not _ops(graph, "GatherElements") and not _ops(graph, "TopK") and not _ops(graph, "ReduceSum")
    for mul in _ops(graph, "Mul"):
        for value in mul.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer.op_type == "Constant" and "value_float" in producer.attributes:
                assert producer.attributes["value_float"].as_float() != 1.0
    # router_probs: the router's log-probabilities and a 0 for each shared expert; the kernel's output
    # scale (1 + 2 shared) is in the down weights, so nothing multiplies the MoE's output
    moes = _ops(graph, "MoE")
    config = mini_config(**V2_ROUTING)
    assert len(moes) == config.num_hidden_layers - config.first_k_dense_replace
    for moe in moes:
        assert moe.attributes["normalize_routing_weights"].as_int() == 0
        assert moe.attributes["k"].as_int() == config.num_experts_per_tok + 2
        chain = []
        value = moe.inputs[1]
        while value is not None and value.producer() is not None and len(chain) < 4:
            chain.append(value.producer().op_type)  # type: ignore[union-attr]
            value = value.producer().inputs[0]  # type: ignore[union-attr]
        assert chain == ["Cast", "Pad", "LogSoftmax", "MatMul"]
        assert (moe.inputs[4].name or "").endswith("_with_shared_times3_float16")  # type: ignore[union-attr]
        (user,) = (u.node for u in moe.outputs[0].uses())
        assert user.op_type == "Cast" and all(u.node.op_type != "Mul" for u in user.outputs[0].uses())


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[str]) -> ir.Model:
    value_infos = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    graph = helper.make_graph(nodes, "g", inputs, value_infos)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def test_multiplication_by_one_goes_only_where_it_changes_nothing() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    nodes = [
        helper.make_node("Constant", [], ["one"], value_float=1.0),
        helper.make_node("Constant", [], ["half"], value_float=2.5),
        helper.make_node("Constant", [], ["ones3"], value=helper.make_tensor("v", TensorProto.FLOAT, [1, 1, 1], [1])),
        helper.make_node("Mul", ["x", "one"], ["a"]),
        helper.make_node("Mul", ["a", "half"], ["b"]),
        helper.make_node("Mul", ["b", "ones3"], ["c"]),  # broadcasting makes [1, 2, 3]: kept
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    model = _model(nodes, [x], ["y"])
    for node in model.graph:
        for out in node.outputs:
            out.shape = ir.Shape([2, 3]) if out.name in ("a", "b") else out.shape
            out.dtype = ir.DataType.FLOAT if out.name in ("a", "b", "c") else out.dtype
    result = MultiplyByOnePass()(model)
    assert result.modified
    muls = [n for n in model.graph if n.op_type == "Mul"]
    assert [m.outputs[0].name for m in muls] == ["b", "c"]
    assert muls[0].inputs[0] is model.graph.inputs[0]


def test_only_inputs_declared_alike_share_a_shape() -> None:
    def info(name: str, dims: list[int | str | None]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    names = {"a": "past_ckv.0", "b": "past_ckv.1", "c": "past_ckv.2", "d": "past_ckv.3", "e": "ids"}
    inputs = [info(names["a"], ["batch", "past", 8]), info(names["b"], ["batch", "past", 8])]
    inputs.append(info(names["c"], ["batch", "other", 8]))
    inputs.append(info(names["d"], ["batch", None, 8]))  # an unnamed dim: not known to be the same
    inputs.append(info(names["e"], ["batch", "past", 8]))  # not the cache's
    nodes = [helper.make_node("Shape", [v], [f"s{k}"]) for k, v in names.items()]
    nodes.append(helper.make_node("Concat", [f"s{k}" for k in names], ["y"], axis=0))
    model = _model(nodes, inputs, ["y"])
    SharedInputShapesPass()(model)
    read = {n.inputs[0].name for n in model.graph if n.op_type == "Shape"}
    assert read == {"past_ckv.0", "past_ckv.2", "past_ckv.3", "ids"}
