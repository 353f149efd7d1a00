"""MXFP8 activations (passes/mxfp8.py, passes/lower_mxfp8.py): the emulation against an independent numpy
MXFP8, E8M0 scales that are powers of two, the lowering of a quantized tiny export in both forms, and
`dsv3c build` accepting it for compute capability 12.x and refusing it for targets without MXFP8.

Tolerance: the emulation in onnxruntime equals the numpy reference bit for bit (both compute the same
power-of-two scales and round to E4M3 the same way); the assertions allow 0 difference.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from dsv3c.artifact import provenance
from dsv3c.errors import UserError
from dsv3c.export.builder import Builder
from dsv3c.passes.mxfp8 import (
    MX_BLOCK,
    TRT_DEQUANTIZE,
    TRT_DYNAMIC_QUANTIZE,
    e8m0_bytes,
    mxfp8_emulated,
    mxfp8_weight,
    pow2_at_least,
)
from dsv3c.passes.ort_run import GraphRunner, random_feeds
from dsv3c.passes.pipelines import MXFP8_STAGE, MXFP8_WEIGHTS_STAGE

from .fixtures.pipeline import PipelineFolders


def mxfp8_reference(x: np.ndarray) -> np.ndarray:
    """MXFP8 round trip in numpy: per 32 values of the last axis, s = the smallest power of two >= amax / 448
    (np.frexp, exact), values cast to E4M3 by ml_dtypes."""
    k = x.shape[-1]
    pad = -k % MX_BLOCK
    blocks = np.pad(x.astype(np.float32), [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], -1, MX_BLOCK)
    ratio = np.maximum(np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(448.0), np.float32(2.0**-126))
    mantissa, exponent = np.frexp(ratio)  # ratio = mantissa * 2^exponent, mantissa in [0.5, 1)
    scale = np.ldexp(np.float32(1.0), np.where(mantissa == 0.5, exponent - 1, exponent)).astype(np.float32)
    q = (blocks / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    return q.reshape(*x.shape[:-1], -1)[..., :k]


def _graph(k: int, build: str) -> ir.Model:
    """x [2, 3, k] -> the emulation (build='mxfp8') or the power-of-two rounding alone (build='pow2')."""
    x = ir.Value(name="x", shape=ir.Shape([2, 3, k]), type=ir.TensorType(ir.DataType.FLOAT))
    b = Builder("t")
    y = mxfp8_emulated(b, x, 3, k) if build == "mxfp8" else pow2_at_least(b, x)
    y.name = "y"
    graph = ir.Graph([x], [y], nodes=b.nodes, opset_imports={"": 23}, name="t")
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return np.asarray(GraphRunner(model, Path(".")).run({"x": x})["y"])


@pytest.mark.parametrize("k", [64, 80, 160])  # whole blocks, and a padded last block
def test_emulation_equals_numpy_mxfp8(k: int) -> None:
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((2, 3, k)) * np.exp(rng.uniform(-8, 8, (2, 3, 1)))).astype(np.float32)
    x[0, 0, :MX_BLOCK] = 0.0  # an all-zero block
    x[0, 1, :MX_BLOCK] = 448.0 * 2.0**-3  # amax / 448 an exact power of two
    got, want = _run(_graph(k, "mxfp8"), x), mxfp8_reference(x)
    assert got.shape == x.shape and np.array_equal(got, want)
    assert not np.array_equal(got, x)  # it quantizes


def test_1x32_blocks_follow_their_own_amax() -> None:
    """One large value spoils only its own 32-block (a 1x128 tile would share its scale over 128)."""
    x = np.full((2, 3, 128), 0.01, np.float32)
    x[..., 0] = 1000.0
    got = _run(_graph(128, "mxfp8"), x)
    assert np.array_equal(got[..., MX_BLOCK:], mxfp8_reference(x)[..., MX_BLOCK:])
    assert np.abs(got[..., MX_BLOCK:] - 0.01).max() < 0.01 * 2**-3  # E4M3's relative step, not the big value's


def test_e8m0_scales_are_the_smallest_powers_of_two_at_least_the_ratio() -> None:
    rng = np.random.default_rng(0)
    x = np.exp2(rng.uniform(-120, 120, (2, 3, 64))).astype(np.float32)
    x[0, 0, :40] = np.exp2(np.arange(-20, 20, dtype=np.float32))  # exact powers of two: log2 must not miss
    s = _run(_graph(64, "pow2"), x)
    mantissa, _ = np.frexp(s)
    assert np.all(mantissa == 0.5)  # powers of two: what E8M0 holds
    assert np.all(s >= x) and np.all(s / 2 < x)


def test_mxfp8_weights_equal_the_numpy_rule_per_row_block() -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((3, 96)) * np.exp(rng.uniform(-6, 6, (3, 1)))).astype(np.float32)
    q, s = mxfp8_weight(w)
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.shape == (3, 3)
    back = q.astype(np.float32).reshape(3, 3, MX_BLOCK) * s[..., None]
    assert np.array_equal(back.reshape(3, 96), mxfp8_reference(w))  # the activations' rule, per weight row
    assert np.array_equal(np.exp2(e8m0_bytes(s).astype(np.float64) - 127), s)  # E8M0 holds exactly s


# ---- the lowering of a quantized export, both forms ----------------------------------------------------


@pytest.fixture(scope="module")
def quantized(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dsv3c quantize's default (128x128 FP8 weights, online 1x128 activation tiles) of the tiny export: the
    folder the graph and CLI tests read too, quantized once per session (tests/fixtures/pipeline.py)."""
    return PipelineFolders(tiny_export, tmp_path_factory.getbasetemp())["quantized"]


@pytest.fixture(scope="module")
def lowered(quantized: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """trt and portable with MXFP8 activations; trt-weights with MXFP8 weights too."""
    from dsv3c.passes.lower import lower_folder
    from dsv3c.passes.pipelines import Target

    root = tmp_path_factory.mktemp("mxfp8")
    out = {}
    for target in (Target.TRT, Target.PORTABLE):
        out[target.value] = root / target.value
        lower_folder(quantized, out[target.value], target, mxfp8=True)
    out["trt-weights"] = root / "trt-weights"
    lower_folder(quantized, out["trt-weights"], Target.TRT, mxfp8=True, mxfp8_weights=True)
    return out


def _nodes(folder: Path, role: str) -> list[onnx.NodeProto]:
    onnx.checker.check_model(str(folder / f"{role}.onnx"))  # valid ONNX, external weights included
    return list(onnx.load(str(folder / f"{role}.onnx"), load_external_data=False).graph.node)


def _marks(n: onnx.NodeProto) -> provenance.Provenance:
    return provenance.read_props({p.key: p.value for p in n.metadata_props})


def test_trt_form_replaces_every_online_tile_and_keeps_provenance(quantized: Path, lowered: dict[str, Path]) -> None:
    for role in ("prefill", "decode", "mtp"):
        online = [n for n in _nodes(quantized, role) if n.op_type == "QuantizeLinear"]
        nodes = _nodes(lowered["trt"], role)
        quantize = [n for n in nodes if n.domain == "trt" and n.op_type == TRT_DYNAMIC_QUANTIZE]
        assert online and len(quantize) == len(online)
        assert not [n for n in nodes if n.op_type == "QuantizeLinear"]  # nothing online is left for TensorRT
        for n in quantize:
            marks = _marks(n)
            assert marks.stage == MXFP8_STAGE and marks.rewrite is not None
            assert marks.rewrite.kind == "quantized" and marks.rewrite.details[:2] == ("mxfp8", "1x32 blocks")
            assert {a.name: a.i for a in n.attribute if a.name != "output_dtype"} == {"axis": -1, "block_size": 32}
            assert any(o.endswith("/quantize") for o in marks.origin)
        # each region is the same in both forms (same origins), the emulated one in standard ops only
        emulated = _nodes(lowered["portable"], role)
        assert not [n for n in emulated if n.domain == "trt"]
        origins = {o for n in quantize for o in _marks(n).origin}
        assert origins == {o for n in emulated if _marks(n).stage == MXFP8_STAGE for o in _marks(n).origin}


def test_lowered_graph_computes_numpy_mxfp8_of_each_activation(lowered: dict[str, Path]) -> None:
    """Inside the lowered (emulated) prefill graph, every MXFP8 region's output equals the numpy MXFP8 of its
    input, bit for bit, on seeded random inputs."""
    from dsv3c.artifact.export_folder import read_export

    graphs = read_export(lowered["portable"])
    model = graphs.models["prefill"]
    regions: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        if provenance.read(node).stage == MXFP8_STAGE:
            regions.setdefault(str(node.name).split("/mxfp8/")[0], []).append(node)
    pairs = []
    for nodes in regions.values():
        inside = {n for n in nodes if n.op_type != "Constant"}  # constants are shared between regions (CSE)

        def outside(v: ir.Value | None, inside: set[ir.Node] = inside) -> bool:
            p = v.producer() if v is not None else None
            return p is not None and p.op_type != "Constant" and p not in inside

        (h,) = {str(v.name) for n in inside for v in n.inputs if v is not None and outside(v)}
        (y,) = [str(o.name) for n in inside for o in n.outputs if any(u not in inside for u, _ in o.uses())]
        pairs.append((h, y))
    assert len(pairs) == 15
    names = [name for pair in pairs for name in pair]
    feeds = random_feeds(graphs.manifest, "prefill", np.random.default_rng(0))
    got = GraphRunner(model, lowered["portable"], extra_outputs=names).run(feeds)
    for h, y in pairs:
        assert np.array_equal(got[y], mxfp8_reference(np.asarray(got[h]))), y


def test_weights_next_to_mxfp8_activations_get_unit_e8m0_scales(lowered: dict[str, Path]) -> None:
    model = onnx.load(str(lowered["trt"] / "decode.onnx"))
    units = [t for t in model.graph.initializer if t.name.endswith("_e8m0_one")]
    dq = [n for n in model.graph.node if n.op_type == TRT_DEQUANTIZE]
    assert units and len(dq) > len(units) - 1
    for t in units:
        assert t.data_type == onnx.TensorProto.UINT8 and set(onnx.numpy_helper.to_array(t).ravel()) == {127}


def test_emulated_lowering_errs_like_the_1x128_tiles(
    tiny_export: Path, quantized: Path, lowered: dict[str, Path]
) -> None:
    """Against the float export: MXFP8 (1x32, power-of-two scales) errs about as much as DeepSeek's 1x128
    tiles (same FP8 weights), with other numbers. Random tiny weights on random tokens: errors of 10-20% and
    undecided argmaxes are normal here (the trained model's loss is the measure: bench/mxfp8_fidelity.py)."""
    from dsv3c.artifact.export_folder import read_export

    logits = {}
    for name, folder in (("float", tiny_export), ("tiles", quantized), ("mxfp8", lowered["portable"])):
        graphs = read_export(folder)
        feeds = random_feeds(graphs.manifest, "prefill", np.random.default_rng(0))
        logits[name] = np.asarray(GraphRunner(graphs.models["prefill"], folder).run(feeds)["logits"], np.float64)

    def rel(a: str, b: str) -> float:
        return float(np.linalg.norm(logits[a] - logits[b]) / np.linalg.norm(logits[b]))

    assert rel("mxfp8", "tiles") > 0 and rel("mxfp8", "float") < 1.5 * rel("tiles", "float")


# ---- dsv3c build: MXFP8 where the target has it --------------------------------------------------------


def _trt_or_skip() -> None:
    from dsv3c.runtime.trt.backend import available

    if available() is not None:
        pytest.skip(f"TensorRT not installed: {available()}")


def test_build_takes_online_scales_as_mxfp8_for_12x(quantized: Path, tmp_path: Path) -> None:
    _trt_or_skip()
    from dsv3c.cli.cmd_build import trt_lowering
    from dsv3c.runtime.trt.build import BuildOptions, build_engines

    options = BuildOptions(roles=["decode"], target_cc=["12.0", "12.1"], lower_for_trt=trt_lowering)
    m = build_engines(quantized, tmp_path / "e", options, log=lambda _: None)
    layers = m.engines["decode"].layers
    online = [n for n in _nodes(quantized, "decode") if n.op_type == "QuantizeLinear"]
    assert m.precision == "fp8" and "--activations mxfp8" in m.source["preparation"]
    assert len(layers.dynamic_quantize) == len(online)
    assert not layers.fp8_gemms and layers.fp8_weight_gemms  # exact weights: a Mul sits between DQ and GEMM


@pytest.mark.parametrize(("target", "lacking"), [(["8.9"], "8.9"), ([], "8.0"), (["8.9", "12.0"], "8.9")])
def test_build_refuses_online_scales_without_mxfp8(
    quantized: Path, tmp_path: Path, target: list[str], lacking: str
) -> None:
    _trt_or_skip()
    from dsv3c.cli.cmd_build import trt_lowering
    from dsv3c.runtime.trt.build import BuildOptions, build_engines

    options = BuildOptions(roles=["decode"], target_cc=target, lower_for_trt=trt_lowering)
    with pytest.raises(UserError) as e:
        build_engines(quantized, tmp_path / "e", options, log=lambda _: None)
    text = str(e.value)
    assert "MXFP8" in text and lacking in text and "--target-cc 12.0" in text and "--calibrate N" in text
    assert not (tmp_path / "e").exists()


def test_build_cli_refusal_is_one_line_exit_2(
    quantized: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _trt_or_skip()
    import dsv3c.cli.main as cli

    code = cli.main(["build", str(quantized), "--out", str(tmp_path / "e"), "--target-cc", "8.9"])
    err = capsys.readouterr().err
    assert code == 2 and "MXFP8" in err and err.count("\n") == 1, err


def test_build_checks_a_folder_lowered_to_mxfp8_beforehand(lowered: dict[str, Path], tmp_path: Path) -> None:
    _trt_or_skip()
    from dsv3c.runtime.trt.build import BuildOptions, build_engines

    with pytest.raises(UserError, match=r"TRT_MXFP8DynamicQuantize.*computes its activation scales online"):
        build_engines(lowered["trt"], tmp_path / "e", BuildOptions(roles=["decode"], target_cc=["8.9"]))


def test_lower_cli_refuses_mxfp8_for_iree(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import dsv3c.cli.main as cli

    argv = ["lower", str(tiny_export), "--target", "iree", "--activations", "mxfp8", "--out", str(tmp_path / "o")]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "--activations mxfp8" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_lowered_manifest_records_the_mxfp8_stage(lowered: dict[str, Path]) -> None:
    import json

    stage = json.loads((lowered["trt"] / "manifest.json").read_text())["stages"][-1]
    assert stage["activations"] == "mxfp8" and MXFP8_STAGE in stage["pipeline"]
    assert stage["changes"][MXFP8_STAGE]["decode"]["mxfp8_activations"] > 0


def test_mxfp8_weights_make_fp8_gemms_for_12x(lowered: dict[str, Path], tmp_path: Path) -> None:
    """Both operands MXFP8: TensorRT's network has fp8 GEMMs (both inputs from fp8 dequantization); with the
    weights' exact 2^0 E8M0 scales and their 128x128 float scales as a Mul it has none (the test above)."""
    _trt_or_skip()
    from dsv3c.runtime.trt.build import BuildOptions, build_engines

    nodes = _nodes(lowered["trt-weights"], "decode")
    weights = [n for n in nodes if n.op_type == TRT_DEQUANTIZE and _marks(n).stage == MXFP8_WEIGHTS_STAGE]
    assert weights and all(_marks(n).rewrite is not None for n in weights)
    options = BuildOptions(roles=["decode"], target_cc=["12.0"])
    with_weights = build_engines(lowered["trt-weights"], tmp_path / "w", options, log=lambda _: None)
    assert len(with_weights.engines["decode"].layers.fp8_gemms) == len(weights)
