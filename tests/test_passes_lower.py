"""Lowerings: portable, ort, trt, iree (+ MLIR): structure, and numbers against the canonical graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from dsv3c.artifact.export_folder import read_export
from dsv3c.artifact.manifest import read_manifest
from dsv3c.cli import main as cli
from dsv3c.errors import UserError
from dsv3c.export.functions import attach_functions
from dsv3c.export.onnx_ops import register_schemas
from dsv3c.passes.lower import lower_folder
from dsv3c.passes.lower_ort import LowerMoEToOrtPass
from dsv3c.passes.mlir import compile_mlir, iree_available, run_vmfb
from dsv3c.passes.ort_run import FeedShape, GraphRunner, random_feeds, relative_error
from dsv3c.passes.pipelines import QuantizeOptions, Target
from dsv3c.passes.quantize import quantize_folder
from dsv3c.passes.rope import match as rope_match
from onnx import TensorProto, helper

from .fixtures.exports import mini_export, torch_model_from_export, weightless_copy

IREE_SHAPE = FeedShape(batch=1, seq=16, decode_seq=1, past=16)  # the iree lowering's default dims


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mini_export(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def quantized(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = quantize_folder(export_dir, tmp_path_factory.mktemp("lq") / "fp8", QuantizeOptions()).folder
    assert out is not None
    return out


def _parity(src: Path, lowered: Path, shape: FeedShape | None = None, tol: float = 1e-4) -> None:
    shape = shape or FeedShape()
    a, b = read_export(src), read_export(lowered)
    assert set(a.models) == set(b.models)
    for role in a.models:
        feeds = random_feeds(a.manifest, role, np.random.default_rng(7), shape)
        want, got = GraphRunner(a.models[role], src).run(feeds), GraphRunner(b.models[role], lowered).run(feeds)
        for name, value in want.items():
            assert relative_error(got[name], value) < tol, (lowered.name, role, name)


def _ops(folder: Path, role: str = "prefill") -> set[str]:
    return {f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in ir.load(folder / f"{role}.onnx").graph}


def test_portable(export_dir: Path, tmp_path: Path) -> None:
    out = lower_folder(export_dir, tmp_path / "portable", Target.PORTABLE).folder
    assert out is not None
    model = ir.load(out / "prefill.onnx")
    assert not model.functions and set(model.opset_imports) == {""}
    assert all(n.domain == "" for n in model.graph)
    custom = [n.name for n in ir.load(export_dir / "prefill.onnx").graph if n.domain == "dsv3c"]
    names = [n.name or "" for n in model.graph]
    for call in custom:  # inlined nodes are named <custom node>/<body node>
        assert sum(name.startswith(f"{call}/") for name in names) > 10, call
    _parity(export_dir, out)


def test_ort(export_dir: Path, quantized: Path, tmp_path: Path) -> None:
    for src, name in ((export_dir, "ort"), (quantized, "ort-fp8")):
        out = lower_folder(src, tmp_path / name, Target.ORT).folder
        assert out is not None
        ops = _ops(out)
        assert "com.microsoft::MoE" in ops and not any(op.startswith("dsv3c::") for op in ops)
        _parity(src, out)


def _moe_model(scoring: str, method: str, norm: int, scale: float, groups: int, with_bias: bool) -> onnx.ModelProto:
    """One dsv3c::MoE node over x [N, D] with random weights (and its reference body)."""
    rng = np.random.default_rng(0)
    experts, hidden, ff, n = 8, 32, 16, 12

    def init(name: str, *shape: int) -> TensorProto:
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [
        init("router", experts, hidden),
        init("gate", experts, ff, hidden),
        init("up", experts, ff, hidden),
        init("down", experts, hidden, ff),
    ]
    if with_bias:
        inits.append(init("bias", experts))
    node = helper.make_node(
        "MoE",
        ["x", "router", "bias" if with_bias else "", "gate", "up", "down"],
        ["y"],
        domain="dsv3c",
        name="moe",
        top_k=2,
        n_group=groups,
        topk_group=2 if groups > 1 else 1,
        routed_scaling_factor=scale,
        norm_topk_prob=norm,
        scoring_func=scoring,
        topk_method=method,
    )
    graph = helper.make_graph(
        [node],
        "moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, hidden])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("dsv3c", 1)], producer_name="dsv3c"
    )
    register_schemas()
    attach_functions(model)
    return model


@pytest.mark.parametrize(
    ("scoring", "method", "norm", "scale", "groups", "with_bias"),
    [
        ("sigmoid", "noaux_tc", 1, 2.5, 4, True),  # DeepSeek-V3
        ("sigmoid", "noaux_tc", 0, 2.5, 4, True),  # weights not normalized: the sum restores them
        ("softmax", "greedy", 0, 1.0, 1, False),  # V2-Lite style
        ("softmax", "group_limited_greedy", 1, 16.0, 4, False),
    ],
)
def test_ort_moe_variants(
    scoring: str, method: str, norm: int, scale: float, groups: int, with_bias: bool, tmp_path: Path
) -> None:
    proto = _moe_model(scoring, method, norm, scale, groups, with_bias)
    model = ir.serde.deserialize_model(proto)
    LowerMoEToOrtPass()(model)
    assert [n.op_type for n in model.graph if n.domain == "com.microsoft"] == ["MoE"]
    x = {"x": np.random.default_rng(1).standard_normal((12, 32)).astype(np.float32)}
    want = GraphRunner(proto, tmp_path).run(x)["y"]
    got = GraphRunner(model, tmp_path).run(x)["y"]
    assert relative_error(got, want) < 1e-5


def test_trt(export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = lower_folder(export_dir, tmp_path / "trt", Target.TRT).folder
    assert out is not None
    for role in ("prefill", "decode", "mtp"):
        model = ir.load(out / f"{role}.onnx")
        assert model.opset_imports[""] == 23 and not model.functions
        layers = 2 if role != "mtp" else 1
        assert sum(n.op_type == "Attention" for n in model.graph) == layers
        assert sum(n.op_type == "RotaryEmbedding" for n in model.graph) == 2 * layers  # q_pe and k_pe
        assert all(n.domain == "" for n in model.graph)
    assert read_manifest(out).opset == 23
    _parity(export_dir, out)
    _trt_build(out / "decode.onnx", read_manifest(out).signatures["decode"].inputs)
    reshape = next(n for n in ir.load(export_dir / "prefill.onnx").graph if n.op_type == "Reshape")
    assert isinstance(rope_match(reshape), str)  # not a rope: the reason, in words
    # online activation scales: refused with the advice to calibrate
    quantized = quantize_folder(export_dir, tmp_path / "dynamic", QuantizeOptions()).folder
    code = _cli(["lower", str(quantized), "--target", "trt", "--out", str(tmp_path / "bad")])
    assert code == 2 and "--calibrate" in capsys.readouterr().err


def test_trt_fp8_static(export_dir: Path, tmp_path: Path) -> None:
    assert _cli(["quantize", str(export_dir), "--out", str(tmp_path / "static"), "--calibrate", "1"]) == 0
    out = lower_folder(tmp_path / "static", tmp_path / "trt", Target.TRT).folder
    assert out is not None
    model = ir.load(out / "prefill.onnx")
    qdq = [n for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(n.inputs[1] is not None and n.inputs[1].is_initializer() for n in qdq)  # constant scales
    assert not any("block_size" in n.attributes for n in qdq)  # TensorRT builds no blocked FP8 GEMM
    fp8 = [n for n in qdq if n.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN and n.inputs[0].is_initializer()]
    assert len(fp8) == 2 * 5 + 3 + 6  # attention, dense MLP, shared + routed experts
    _parity(tmp_path / "static", out)
    _trt_build(out / "prefill.onnx", read_manifest(out).signatures["prefill"].inputs)


def _trt_build(path: Path, inputs: list) -> None:  # type: ignore[type-arg]
    """Parse and build with TensorRT-RTX on the CPU (its engines run on 8.x/12.x GPUs only: docs/toolchain.md)."""
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (the 'tensorrt' extra)")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path)), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    for i in range(network.num_layers):  # no fused fp32 attention kernel: let TensorRT decompose it
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.ATTENTION_INPUT:
            layer.__class__ = trt.IAttentionInputLayer
            layer.attention.decomposable = True
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    sizes = (
        {"batch": 1, "seq": 1, "q": 1, "past": 0},
        {"batch": 2, "seq": 8, "q": 1, "past": 8},
        {"batch": 4, "seq": 32, "q": 4, "past": 32},
    )
    for t in inputs:
        profile.set_shape(t.name, *([d if isinstance(d, int) else s[d] for d in t.shape] for s in sizes))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None


def test_iree(export_dir: Path, quantized: Path, tmp_path: Path) -> None:
    for src, name in ((export_dir, "iree"), (quantized, "iree-fp8")):
        out = lower_folder(src, tmp_path / name, Target.IREE).folder
        assert out is not None
        model = ir.load(out / "decode.onnx")
        assert all(isinstance(d, int) for v in model.graph.inputs for d in v.shape.dims)
        assert all("block_size" not in n.attributes for n in model.graph) and all(n.domain == "" for n in model.graph)
        assert read_manifest(out).signatures["decode"].inputs[0].shape == [1, 1]
        _parity(src, out, IREE_SHAPE)


def test_weightless_folders_lower_structurally(export_dir: Path, tmp_path: Path) -> None:
    src = quantize_folder(weightless_copy(export_dir, tmp_path / "none"), tmp_path / "q", QuantizeOptions()).folder
    assert src is not None
    for target in (Target.PORTABLE, Target.ORT, Target.IREE):
        out = lower_folder(src, tmp_path / target.value, target).folder
        assert out is not None and not (out / "weights.bin").exists()
        weights = [
            v for v in ir.load(out / "prefill.onnx").graph.initializers.values() if v.dtype == ir.DataType.FLOAT8E4M3FN
        ]
        assert len(weights) == 19 and all(isinstance(v.const_value, ir.ExternalTensor) for v in weights)
    with pytest.raises(UserError, match="no weights"):
        lower_folder(src, tmp_path / "mlir", Target.IREE, emit_mlir=True)


def test_bad_requests_exit_2(export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["lower", str(export_dir), "--out", str(tmp_path / "x")]
    assert _cli([*base, "--target", "ort", "--emit", "mlir"]) == 2
    assert _cli([*base, "--target", "iree", "--shape", "batch=0"]) == 2
    assert _cli([*base, "--target", "iree", "--shape", "nonsense=2"]) == 2
    assert _cli(["lower", str(tmp_path / "missing"), "--target", "ort", "--out", str(tmp_path / "y")]) == 2
    assert "error" in capsys.readouterr().err


def _cli(argv: list[str]) -> int:
    return cli.main(argv)


@pytest.mark.skipif(iree_available() is not None, reason=f"IREE is not installed: {iree_available()}")
def test_mlir_compiles_and_matches_pytorch(export_dir: Path, tmp_path: Path) -> None:
    out = lower_folder(export_dir, tmp_path / "mlir", Target.IREE, emit_mlir=True).folder
    assert out is not None
    assert read_manifest(out).stages[-1]["mlir"] == {r: f"{r}.mlir" for r in ("prefill", "decode", "mtp")}
    vmfb = compile_mlir(out / "prefill.mlir", tmp_path / "prefill.vmfb")
    graphs = read_export(out)
    feeds = random_feeds(graphs.manifest, "prefill", np.random.default_rng(0), IREE_SHAPE)
    got = run_vmfb(vmfb, "prefill", [feeds[v.name] for v in graphs.models["prefill"].graph.inputs])  # type: ignore[index]
    model = torch_model_from_export(export_dir)
    with torch.no_grad():
        ref = model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["positions"]))
    assert relative_error(got[0], ref.logits.numpy()) < 1e-4
