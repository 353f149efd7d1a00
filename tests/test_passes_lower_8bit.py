"""`lower --target ort --weights-8bit`: MatMulNBits / QMoE structure, exact layouts, the recorded error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from dsv3c.artifact.manifest import read_manifest
from dsv3c.artifact.names import TRANSPOSED_SUFFIX
from dsv3c.cli import main as cli
from dsv3c.models.config import DeepseekV3Config
from dsv3c.onnxkit.linears import LinearKind, rewritable_linears
from dsv3c.passes.lower import lower_folder
from dsv3c.passes.lower_ort_8bit import (
    Int8Options,
    MatMulNBitsPass,
    MoEToQMoEPass,
    dequantize_rows,
    qmoe_block,
    quantize_rows,
)
from dsv3c.passes.ort_run import GraphRunner, relative_error
from dsv3c.passes.pipelines import QuantizeOptions, Target
from dsv3c.passes.quantize import quantize_folder
from dsv3c.runtime.bench.memory import graph_weight_bytes, weight_bytes_per_step
from onnx import TensorProto, helper

from .fixtures.exports import mini_export, weightless_copy

# Measured on the mini export (2 layers of the tiny preset, seeded random inputs, block 128): the first
# linear adds 0.6-0.9 % (the cache it writes), logits differ by ~8e-2 relative (Frobenius) because a few
# tokens' routing flips to another expert; the median token differs by ~2e-2 (see the module docstring of
# passes/lower_ort_8bit.py; a 1e-3 random perturbation of the float weights already moves logits 8e-2).
FIRST_LINEAR_TOL = 1.5e-2
MEDIAN_TOKEN_TOL = 5e-2
LOGITS_TOL = 0.15


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mini_export(tmp_path_factory.getbasetemp())  # shared with test_passes_lower.py


@pytest.fixture(scope="module")
def quantized(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = quantize_folder(export_dir, tmp_path_factory.mktemp("q8") / "fp8", QuantizeOptions()).folder
    assert out is not None
    return out


def test_quantize_rows_round_trip() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 5, 200)).astype(np.float32)
    w[0, 1] = 0.0  # an all-zero row
    q, s = quantize_rows(w, 64)
    assert q.dtype == np.uint8 and q.shape == (3, 5, 4, 64) and s.shape == (3, 5, 4)
    back = dequantize_rows(q, s, 200)
    assert back.shape == w.shape and np.all(back[0, 1] == 0)
    step = np.repeat(s, 64, axis=-1)[..., :200]
    assert np.all(np.abs(back - w) <= step / 2 + 1e-7)  # round to nearest
    assert q.min() >= 1 and q.max() <= 255  # symmetric: -127..127 around the zero point 128
    assert qmoe_block(128, 160, 96) == 32 and qmoe_block(128, 1024, 512) == 128 and qmoe_block(128, 100, 96) is None


def _one_linear_and_moe() -> onnx.ModelProto:
    """x [N, D] -> MatMul(x, Transpose(W)) -> dsv3c::MoE, float weights (the exporter's patterns)."""
    from dsv3c.export.functions import attach_functions
    from dsv3c.export.onnx_ops import register_schemas

    rng = np.random.default_rng(0)
    experts, hidden, ff, n = 8, 64, 32, 6

    def init(name: str, *shape: int) -> TensorProto:
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [
        init("w", hidden, hidden),
        init("router", experts, hidden),
        init("gate", experts, ff, hidden),
        init("up", experts, ff, hidden),
        init("down", experts, hidden, ff),
    ]
    moe = helper.make_node(
        "MoE",
        ["h", "router", "", "gate", "up", "down"],
        ["y"],
        domain="dsv3c",
        name="moe",
        top_k=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=1,
        scoring_func="softmax",
        topk_method="greedy",
    )
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["h"]),
        moe,
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, hidden])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, hidden]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [n, hidden]),
        ],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("dsv3c", 1)], producer_name="dsv3c"
    )
    register_schemas()
    attach_functions(model)
    return model


def test_layouts_are_exact(tmp_path: Path) -> None:
    """Against the float graph holding the dequantized 8-bit weights: MatMulNBits with fp32 activations
    (accuracy_level 0) is exact; QMoE's 8-bit kernel quantizes its activations to int8 (about 1 %)."""
    proto = _one_linear_and_moe()
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    reference = onnx.ModelProto()
    reference.CopyFrom(proto)
    for t in reference.graph.initializer:
        if t.name != "router":
            q, s = quantize_rows(weights[t.name], 32)
            t.CopyFrom(onnx.numpy_helper.from_array(dequantize_rows(q, s, weights[t.name].shape[-1]), t.name))
    model = ir.serde.deserialize_model(proto)
    options = Int8Options(block=32, accuracy_level=0)
    MatMulNBitsPass(options)(model)
    MoEToQMoEPass(options)(model)
    ops = [n.op_type for n in model.graph if n.domain == "com.microsoft"]
    assert ops == ["MatMulNBits", "QMoE"]
    x = {"x": np.random.default_rng(1).standard_normal((6, 64)).astype(np.float32)}
    want, got = GraphRunner(reference, tmp_path).run(x), GraphRunner(model, tmp_path).run(x)
    assert relative_error(got["h"], want["h"]) < 1e-5
    assert relative_error(got["y"], want["y"]) < 3e-2


@pytest.mark.parametrize("source", ["float", "fp8"])
def test_ort_8bit(source: str, export_dir: Path, quantized: Path, tmp_path: Path) -> None:
    src = export_dir if source == "float" else quantized
    out = lower_folder(src, tmp_path / "ort8", Target.ORT, weights_8bit=128).folder
    assert out is not None
    before = {lin.name: lin.kind for lin in rewritable_linears(ir.load(src / "decode.onnx").graph)}
    for role in ("prefill", "decode", "mtp"):
        model = ir.load(out / f"{role}.onnx")
        nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
        qmoe = [n for n in model.graph if n.op_type == "QMoE"]
        assert nbits and all(n.attributes["bits"].as_int() == 8 and n.domain == "com.microsoft" for n in nbits)
        assert qmoe and all(n.attributes["expert_weight_bits"].as_int() == 8 for n in qmoe)
        assert not any(
            n.op_type in ("MatMul", "MoE")
            and n.inputs[1] is not None
            and n.inputs[1].is_initializer()
            and n.inputs[1].dtype != ir.DataType.FLOAT
            for n in model.graph
        )
        assert not any(n.domain == "dsv3c" for n in model.graph)
        for node in nbits:  # B: uint8 [N, blocks, 128]; scales float32 [N, blocks]
            b, s = node.inputs[1], node.inputs[2]
            assert b is not None and s is not None and b.dtype == ir.DataType.UINT8 and s.dtype == ir.DataType.FLOAT
            n, k = node.attributes["N"].as_int(), node.attributes["K"].as_int()
            assert list(b.shape) == [n, -(-k // 128), 128] and list(s.shape) == [n, -(-k // 128)]
        names = set(model.graph.initializers)
        if role == "decode":  # every converted linear's own weight (float or fp8) is gone
            converted = [n for n, kind in before.items() if kind in (LinearKind.MATMUL, LinearKind.MOE_EXPERTS)]
            assert converted and not names & set(converted)
            assert not any(n.removesuffix(".weight") + ".weight_scale_inv" in names for n in converted)
            router = "model.layers.1.mlp.gate.weight"  # stays float (stored transposed where float32)
            assert names & {router, router + TRANSPOSED_SUFFIX}
    stage = read_manifest(out).stages[-1]
    assert stage["weights_8bit"] == {"bits": 8, "block": 128, "accuracy_level": 4, "symmetric": True, "linears": True}
    error = stage["error_vs_source"]
    assert error["measured"] and error["max_logits"] < LOGITS_TOL
    assert error["max_median_token_logits"] < MEDIAN_TOKEN_TOL
    assert error["outputs"]["prefill"]["new_ckv.0"] < FIRST_LINEAR_TOL


def test_weight_bytes_from_the_graph(export_dir: Path, tmp_path: Path) -> None:
    """The benchmark reads weight sizes from the graph: 8-bit weights count 1 byte (plus scales)."""
    plain = lower_folder(export_dir, tmp_path / "ort", Target.ORT).folder
    eight = lower_folder(export_dir, tmp_path / "ort8", Target.ORT, weights_8bit=128).folder
    assert plain is not None and eight is not None
    config = DeepseekV3Config.from_dict(read_manifest(plain).config)
    fp32 = graph_weight_bytes(read_manifest(plain))
    int8 = graph_weight_bytes(read_manifest(eight))
    for tokens in (1, 64):
        assert fp32(tokens) == weight_bytes_per_step(config, tokens, 4)
        assert 0.2 < int8(tokens) / fp32(tokens) < 0.5  # router, kv_b, norms and embedding rows stay float


def test_weightless_and_bad_requests(export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = weightless_copy(export_dir, tmp_path / "none")
    out = lower_folder(src, tmp_path / "ort8", Target.ORT, weights_8bit=32).folder
    assert out is not None and not (out / "weights.bin").exists()
    assert read_manifest(out).stages[-1]["error_vs_source"]["measured"] is False
    assert any(n.op_type == "QMoE" for n in ir.load(out / "decode.onnx").graph)
    base = ["lower", str(export_dir), "--out", str(tmp_path / "x")]
    assert cli.main([*base, "--target", "trt", "--weights-8bit"]) == 2
    assert cli.main([*base, "--target", "ort", "--weights-8bit", "--block-8bit", "48"]) == 2
    assert cli.main([*base, "--target", "ort", "--block-8bit", "32"]) == 2
    assert cli.main([*base, "--target", "ort", "--weights-8bit-scope", "experts"]) == 2
    assert "error" in capsys.readouterr().err


def test_bf16_graphs_store_scales_in_the_kernels_dtypes(tmp_path: Path) -> None:
    """A bf16 export (what runs on the GPU: onnxruntime's CUDA QMoE takes float16 and bfloat16 only):
    MatMulNBits reads bf16 activations with bf16 scales, QMoE runs in float16 between Casts with float16
    scales, and the 8-bit bytes are those of the fp32 export of the same weights."""
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder
    from dsv3c.models.checkpoint import init_random, save_model

    from .fixtures.exports import mini_config

    ckpt = tmp_path / "ckpt"
    save_model(init_random(mini_config(), seed=0), ckpt, dtype="bf16")
    folders = {}
    for dtype in ("fp32", "bf16"):
        export(from_folder(ckpt), tmp_path / f"export-{dtype}", weights="checkpoint", dtype=dtype)
        out = lower_folder(tmp_path / f"export-{dtype}", tmp_path / f"ort8-{dtype}", Target.ORT, weights_8bit=32)
        assert out.folder is not None
        folders[dtype] = out.folder
    assert read_manifest(folders["bf16"]).stages[-1]["error_vs_source"]["measured"] is False
    graph = onnx.load(str(folders["bf16"] / "decode.onnx"))
    values = {v.name: v.type.tensor_type.elem_type for v in (*graph.graph.value_info, *graph.graph.input)}
    init = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    kinds = {t.name: t.data_type for t in graph.graph.initializer}
    producers = {o: n for n in graph.graph.node for o in n.output}
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    qmoe = [n for n in graph.graph.node if n.op_type == "QMoE"]
    assert nbits and qmoe
    for n in nbits:
        assert kinds[n.input[2]] == TensorProto.BFLOAT16
        assert values.get(n.input[0], TensorProto.BFLOAT16) == TensorProto.BFLOAT16
    for n in qmoe:
        assert producers[n.input[0]].op_type == "Cast" and producers[n.input[1]].op_type == "Cast"
        assert kinds[n.input[3]] == kinds[n.input[6]] == TensorProto.FLOAT16
    fp32 = onnx.load(str(folders["fp32"] / "decode.onnx"))
    ref = {t.name: onnx.numpy_helper.to_array(t) for t in fp32.graph.initializer}
    # the bf16 graph's QMoE holds the shared experts after the routed ones (fp32 keeps them apart:
    # tests/test_passes_lower_8bit_shared_experts.py); the routed experts' bytes are the same
    q8 = [name for name in init if name.endswith("_q8")]
    assert q8 and all(np.array_equal(init[n][: len(ref[_apart(n)])], ref[_apart(n)]) for n in q8)
    for name in (n for n in init if n.endswith("_q8_scales")):
        want = ref[_apart(name)]
        np.testing.assert_allclose(init[name][: len(want)].astype(np.float32), want, rtol=2**-7)


def _apart(name: str) -> str:
    return name.replace("_with_shared", "")


def test_experts_only(export_dir: Path, tmp_path: Path) -> None:
    """`--weights-8bit-scope experts`: QMoE for the routed experts, the linears stay float MatMuls (a flag
    before the folder still takes no value)."""
    out = tmp_path / "experts"
    args = ["lower", "--weights-8bit", str(export_dir), "--target", "ort", "--weights-8bit-scope", "experts"]
    args += ["--out", str(out)]
    assert cli.main(args) == 0
    graph = ir.load(out / "decode.onnx").graph
    ops = {n.op_type for n in graph}
    assert "QMoE" in ops and "MatMulNBits" not in ops
    assert [n for n in graph if n.op_type == "MatMul" and any("self_attn" in (v.name or "") for v in n.inputs)]
    stage = read_manifest(out).stages[-1]
    assert stage["weights_8bit"]["linears"] is False
    assert stage["error_vs_source"]["measured"] and stage["error_vs_source"]["max_logits"] < LOGITS_TOL
