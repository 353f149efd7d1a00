"""TensorRT-RTX's native layers on small graphs: what the parser and builder do without a GPU.

These pin the measured behaviour the `trt` lowering relies on (docs/toolchain.md): opset-23
RotaryEmbedding becomes a native ROTARY_EMBEDDING layer; opset-23 Attention becomes native attention
(ATTENTION_INPUT/OUTPUT) that needs equal Q/K/V head sizes, has fused kernels in 16-bit types only (fp32 is
decomposed once allowed), and takes one shared K/V head (MQA, the absorbed-MLA form); the network API's
MoE layer and 1x128 dynamic quantization do not build. If one of these changes with a new TensorRT, the
lowering can change with it: update docs/toolchain.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from dsv3c.artifact.manifest import Signature, TensorInfo
from dsv3c.errors import UserError
from dsv3c.runtime.trt.backend import available
from onnx import TensorProto, helper

pytestmark = pytest.mark.skipif(available() is not None, reason=f"TensorRT not installed: {available()}")
Ranges = dict[str, tuple[list[int], list[int], list[int]]]


def _build(model: onnx.ModelProto, ranges: Ranges, tmp_path: Path) -> Any:
    from dsv3c.artifact.engine_manifest import ShapeRange
    from dsv3c.runtime.trt.backend import load_backend
    from dsv3c.runtime.trt.build import build_one
    from dsv3c.runtime.trt.prepare import NodeRef, ParserInput

    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    nodes = [NodeRef(i, n.name, n.op_type) for i, n in enumerate(model.graph.node)]

    def info(v: onnx.ValueInfoProto) -> TensorInfo:
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        return TensorInfo(v.name, "float32", dims)

    signature = Signature([info(v) for v in model.graph.input], [info(v) for v in model.graph.output])
    profile = {name: ShapeRange(*r) for name, r in ranges.items()}
    graph = ParserInput("decode", path, model.SerializeToString(), nodes, False, [])
    record, _ = build_one(load_backend(), graph, signature, profile, [], b"", tmp_path)
    return record


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    output: onnx.ValueInfoProto,
    inits: Sequence[onnx.TensorProto] = (),
) -> onnx.ModelProto:
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, [output], list(inits)), opset_imports=[helper.make_opsetid("", 23)]
    )
    model.ir_version = 10
    return model


def test_rotary_embedding_becomes_a_native_layer(tmp_path: Path) -> None:
    table = [
        helper.make_tensor(n, TensorProto.FLOAT, [1024, 8], np.random.rand(1024, 8).astype(np.float32).ravel())
        for n in ("cos", "sin")
    ]
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], name="rope", interleaved=1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, "seq", 16])
    pos = helper.make_tensor_value_info("pos", TensorProto.INT64, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, "seq", 16])
    ranges = {"x": ([1, 4, 1, 16], [1, 4, 16, 16], [4, 4, 64, 16]), "pos": ([1, 1], [1, 16], [4, 64])}
    record = _build(_model([node], [x, pos], y, table), ranges, tmp_path)
    assert record.layers.rotary == ["rope"] and record.layers.by_type["ROTARY_EMBEDDING"] == 1


def _attention(dtype: int, q_dim: int, v_dim: int) -> tuple[onnx.ModelProto, Ranges]:
    """MLA absorbed form: 4 query heads over one shared latent K/V head, with a boolean mask [B, 1, S, T]."""
    node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["o"], name="attn", scale=0.125)
    inputs = [
        helper.make_tensor_value_info("q", dtype, ["batch", 4, "q", q_dim]),
        helper.make_tensor_value_info("k", dtype, ["batch", 1, "past", q_dim]),
        helper.make_tensor_value_info("v", dtype, ["batch", 1, "past", v_dim]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 1, "q", "past"]),
    ]
    out = helper.make_tensor_value_info("o", dtype, ["batch", 4, "q", v_dim])
    ranges = {
        "q": ([1, 4, 1, q_dim], [1, 4, 1, q_dim], [8, 4, 2, q_dim]),
        "k": ([1, 1, 1, q_dim], [1, 1, 256, q_dim], [8, 1, 1024, q_dim]),
        "v": ([1, 1, 1, v_dim], [1, 1, 256, v_dim], [8, 1, 1024, v_dim]),
        "mask": ([1, 1, 1, 1], [1, 1, 1, 256], [8, 1, 2, 1024]),
    }
    return _model([node], inputs, out), ranges


def test_half_precision_attention_is_native_and_fused(tmp_path: Path) -> None:
    record = _build(*_attention(TensorProto.FLOAT16, 80, 80), tmp_path)  # tiny's r + rope = 64 + 16
    assert record.layers.attention == ["attn_AttentionInput"] and not record.layers.attention_decomposable


def test_fp32_attention_is_native_but_decomposed(tmp_path: Path) -> None:
    record = _build(*_attention(TensorProto.FLOAT, 80, 80), tmp_path)  # no fused fp32 kernel: allowed, rebuilt
    assert record.layers.attention and record.layers.attention_decomposable


def test_attention_with_unequal_head_sizes_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cannot parse node 0 'attn' \(Attention\):.*same head dimension"):
        _build(*_attention(TensorProto.FLOAT16, 48, 32), tmp_path)  # naive MLA: qk 48, v 32 (pad v to use it)


# ---- the network API (no ONNX operator maps to these) ----------------------------------------------------


def _network_build(make: Callable[[Any, Any], dict[str, Any]], cc: str = "12.0") -> bool:
    from dsv3c.runtime.trt.backend import cc_enum, load_backend, make_logger, native_stderr

    backend = load_backend()
    if not backend.is_rtx:
        pytest.skip("measured on TensorRT-RTX")
    trt = backend.trt
    logger = make_logger(backend)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    shapes = make(trt, network)
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(cc_enum(backend, cc), 0)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    with native_stderr([]):  # Myelin's "Internal Error" lines
        return builder.build_serialized_network(network, config) is not None


@pytest.mark.parametrize("cc", ["8.9", "12.0"])
def test_native_moe_does_not_build(cc: str) -> None:
    experts, hidden, ff, k = 8, 256, 128, 2

    def make(trt: Any, net: Any) -> dict[str, Any]:
        h = net.add_input("h", trt.float16, (-1, -1, hidden))  # 3-D hidden states: the layer requires them
        sel = net.add_input("sel", trt.int32, (-1, -1, k))
        score = net.add_input("score", trt.float16, (-1, -1, k))
        moe = net.add_moe(h, sel, score)

        def w(shape: tuple[int, ...]) -> Any:
            return net.add_constant(shape, np.random.rand(*shape).astype(np.float16)).get_output(0)

        moe.set_gated_weights(
            w((experts, hidden, ff)), w((experts, hidden, ff)), w((experts, ff, hidden)), trt.MoEActType.SILU
        )
        net.mark_output(moe.get_output(0))
        return {n: ((1, 1, d), (1, 8, d), (4, 64, d)) for n, d in (("h", hidden), ("sel", k), ("score", k))}

    assert not _network_build(make, cc), "native MoE builds now: measure it against the decomposition"


@pytest.mark.parametrize(("block", "scale", "builds"), [(32, "e8m0", True), (128, "float32", False)])
def test_dynamic_quantize_takes_mxfp8_blocks_only(block: int, scale: str, builds: bool) -> None:
    def make(trt: Any, net: Any) -> dict[str, Any]:
        x = net.add_input("x", trt.float16, (-1, 256))
        dq = net.add_dynamic_quantize_v2(x, trt.Dims([1, block]), trt.fp8, getattr(trt, scale))
        net.mark_output(dq.get_output(0))
        net.mark_output(dq.get_output(1))
        return {"x": ((1, 256), (8, 256), (64, 256))}

    assert _network_build(make) is builds
