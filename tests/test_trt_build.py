"""dsv3c build: engines for the tiny preset in fp32 and fp8, engine_manifest.json, inspection, clear errors.

TensorRT-RTX builds without a GPU, so every test here runs on the CPU machine. Until the passes issue's
FP8 pass output builds in TensorRT, the fp8 graphs are made here (`fp8_export`): per-channel fp8 weights
with static per-tensor activation Q/DQ (what TensorRT fuses into fp8 GEMMs), or weight-only block scales.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from dsv3c.errors import UserError
from dsv3c.runtime.trt.backend import available
from onnx import TensorProto, helper, numpy_helper

from .fixtures.exports import without_function_bodies

pytestmark = pytest.mark.skipif(available() is not None, reason=f"TensorRT not installed: {available()}")


# ---- an fp8 test graph: the linears of one graph get fp8 weights (and optionally static activation Q/DQ) ----


def _quantize_linear(
    graph: onnx.GraphProto, matmul: onnx.NodeProto, weight: onnx.TensorProto, block: int, static: bool
) -> list[onnx.NodeProto]:
    w = numpy_helper.to_array(weight).astype(np.float32)  # [N, K], used as Transpose(W) -> MatMul
    name = weight.name
    if block:  # one scale per row and per `block` columns, the last block partial when block does not divide K
        padded = np.pad(w, ((0, 0), (0, -w.shape[1] % block)))
        scale = np.abs(padded).reshape(w.shape[0], -1, block).max(axis=2) / 448  # [N, ceil(K / block)]
        q = w / np.repeat(scale, block, axis=1)[:, : w.shape[1]]
        dq = helper.make_node(
            "DequantizeLinear",
            [f"{name}.fp8", f"{name}.scale"],
            [f"{name}.deq"],
            name=f"{name}/dq",
            axis=1,
            block_size=block,
        )
    else:  # one scale per output channel
        scale = np.abs(w).max(axis=1) / 448  # [N]
        q = w / scale[:, None]
        dq = helper.make_node(
            "DequantizeLinear", [f"{name}.fp8", f"{name}.scale"], [f"{name}.deq"], name=f"{name}/dq", axis=0
        )
    fp8 = q.astype(ml_dtypes.float8_e4m3fn).view(np.uint8).tobytes()
    graph.initializer.append(helper.make_tensor(f"{name}.fp8", TensorProto.FLOAT8E4M3FN, list(w.shape), fp8, raw=True))
    graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}.scale"))
    nodes = [dq]
    if static:
        x, s = matmul.input[0], f"{matmul.name}.input_scale"
        graph.initializer.append(numpy_helper.from_array(np.array(0.05, np.float32), s))
        xq, xdq = f"{matmul.name}.x_q", f"{matmul.name}.x_dq"  # linears reading one activation: a pair each
        nodes += [
            helper.make_node(
                "QuantizeLinear", [x, s], [xq], name=f"{matmul.name}/q", output_dtype=TensorProto.FLOAT8E4M3FN
            ),
            helper.make_node("DequantizeLinear", [xq, s], [xdq], name=f"{matmul.name}/dq"),
        ]
        matmul.input[0] = xdq
    return nodes


def fp8_export(src: Path, dst: Path, role: str = "decode", block: int = 0, static: bool = True) -> int:
    """Copy an export folder and quantize the linears of `role`; returns how many were quantized."""
    shutil.copytree(src, dst)
    model = onnx.load(str(src / f"{role}.onnx"))  # weights loaded: the new graph file is self-contained
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    before: dict[int, list[onnx.NodeProto]] = {}  # node index -> what goes right before it
    count = 0
    for i, n in enumerate(g.node):
        k = producer.get(n.input[1], -1) if n.op_type == "MatMul" else -1
        t = g.node[k] if k >= 0 else None
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits or t.input[0].startswith("lm_head"):
            continue
        weight = inits[t.input[0]]
        new = _quantize_linear(g, n, weight, block, static)
        t.input[0] = f"{weight.name}.deq"
        before.setdefault(k, []).append(new[0])
        if static:
            before.setdefault(i, []).extend(new[1:])
        count += 1
    nodes = [x for i, n in enumerate(g.node) for x in [*before.get(i, []), n]]
    used = {i for n in nodes for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.node[:], g.initializer[:]
    g.node.extend(nodes)
    g.initializer.extend(kept)
    onnx.save(model, str(dst / f"{role}.onnx"))
    return count


# ---- fixtures: one fp32 engine folder and one fp8 folder for the module ----------------------------------


def _log(lines: list[str], line: str) -> None:
    lines.append(line)
    print(line)  # build times show with pytest -s


@pytest.fixture(scope="module")
def fp32_engines(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    from dsv3c.cli.cmd_build import trt_lowering
    from dsv3c.runtime.trt.build import BuildOptions, build_engines

    out = tmp_path_factory.mktemp("trt") / "engines"
    lines: list[str] = []
    options = BuildOptions(timing_cache=out.parent / "timing.cache", lower_for_trt=trt_lowering)
    build_engines(tiny_export, out, options, log=lambda line: _log(lines, line))
    return out, lines


@pytest.fixture(scope="module")
def fp8_engines(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    from dsv3c.runtime.trt.build import BuildOptions, build_engines

    root = tmp_path_factory.mktemp("trt-fp8")
    assert fp8_export(tiny_export, root / "exp") > 0
    lines: list[str] = []
    options = BuildOptions(precision="fp8", roles=["decode"], target_cc=["8.9", "12.0"], lowering="inline")
    build_engines(root / "exp", root / "engines", options, log=lambda line: _log(lines, line))
    return root / "engines", lines


def test_fp32_engines_build_with_times_printed(fp32_engines: tuple[Path, list[str]]) -> None:
    folder, lines = fp32_engines
    assert lines[0].startswith("backend: tensorrt") and lines[1].startswith("graphs: ")
    for role in ("prefill", "decode", "mtp"):
        assert (folder / f"{role}.engine").stat().st_size > 1_000_000
        assert any(line.startswith(f"{role}: built in ") for line in lines)
    if "tensorrt_rtx" in lines[0]:  # TensorRT-RTX has no timing cache: the build says so, writes none
        assert any(line.startswith("timing cache: not used") for line in lines)
    else:
        assert (folder.parent / "timing.cache").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".partial")]


def test_engine_manifest_records_the_build(fp32_engines: tuple[Path, list[str]]) -> None:
    from dsv3c.artifact.engine_manifest import read_engine_manifest

    folder, _ = fp32_engines
    m = read_engine_manifest(folder)
    assert m.precision == "fp32" and m.backend["name"] in ("tensorrt", "tensorrt_rtx") and m.backend["version"]
    decode = m.engines["decode"]
    assert decode.bytes == (folder / decode.file).stat().st_size and decode.build_seconds > 0
    assert [t.name for t in decode.inputs][:3] == ["input_ids", "positions", "past_ckv.0"]
    assert decode.inputs[2].shape == ["batch", "past", 64] and decode.outputs[0].name == "logits"
    past = decode.profiles[0]["past_ckv.0"]
    assert past.min == [1, 0, 64] and past.max[1] == 1024  # past 0..max_position_embeddings, batch 1..8
    assert decode.layers.total > 100 and decode.layers.by_type["MATRIX_MULTIPLY"] > 0 and not decode.layers.fp8
    assert {"8.9", "12.0"} <= set(decode.engine_cc)
    assert json.loads((folder / "engine_manifest.json").read_text())["format_version"] == 1


def test_inspect_engine_folder_text_json_and_validity(fp32_engines: tuple[Path, list[str]]) -> None:
    from dsv3c.artifact.engine_manifest import read_engine_manifest
    from dsv3c.runtime.trt.inspect import inspect_engine_folder, render_json, render_text

    folder, _ = fp32_engines
    ok = inspect_engine_folder(folder, ["8.9"])
    text = render_text(ok)
    assert ok.valid and "check 8.9: valid" in text and "tensorrt" in text
    assert "past 0..256..1024" in text
    decode = ok.engines[1].layers
    assert f"native   attention {len(decode.attention)}" in text and f"rotary {len(decode.rotary)}" in text
    if "dsv3c lower" in read_engine_manifest(folder).source["preparation"]:  # the passes issue's trt lowering
        assert decode.attention and decode.rotary and decode.attention[0] in text  # Attention, RotaryEmbedding
    bad = inspect_engine_folder(folder, ["9.0"])  # the H200: TensorRT-RTX does not target it
    assert bad.valid is False and "9.0 is not among the engines' targets" in bad.validity[0]
    data = json.loads(render_json(bad))
    assert data["engines"][1]["header"]["cc"] == ok.engine_cc and data["total_bytes"] > 0


def test_inspect_reports_a_truncated_engine(fp32_engines: tuple[Path, list[str]], tmp_path: Path) -> None:
    from dsv3c.runtime.trt.inspect import inspect_engine_folder

    copy = tmp_path / "engines"
    shutil.copytree(fp32_engines[0], copy)
    data = (copy / "mtp.engine").read_bytes()
    (copy / "mtp.engine").write_bytes(data[: len(data) // 2])
    report = inspect_engine_folder(copy, ["8.9"])
    assert report.valid is False and any("truncated" in r for r in report.validity)


def test_fp8_engine_lists_fp8_layers(fp8_engines: tuple[Path, list[str]]) -> None:
    from dsv3c.runtime.trt.inspect import inspect_engine_folder, render_text

    folder, lines = fp8_engines
    assert any("fp8 GEMMs 21" in line for line in lines)
    report = inspect_engine_folder(folder, ["12.0"])
    layers = report.engines[0].layers
    assert report.precision == "fp8" and report.engine_cc == ["8.9", "12.0"] and report.valid
    assert len(layers.fp8_gemms) == 21 and "model.layers.0.self_attn.q_a_proj.weight/dq" in layers.fp8
    assert "fp8 GEMMs 21 (" in render_text(report)


def test_quantized_export_builds_through_the_trt_lowering(tiny_export: Path, tmp_path: Path) -> None:
    """The passes issue's chain: dsv3c quantize (fp8, calibrated static scales) -> lower --target trt -> build."""
    try:
        from dsv3c.passes.fp8_math import ActScheme, WeightScheme
        from dsv3c.passes.pipelines import QuantizeOptions
        from dsv3c.passes.quantize import quantize_folder
    except ImportError as e:
        pytest.skip(f"the FP8 pass is not there yet: {e}")
    from dsv3c.cli.cmd_build import trt_lowering
    from dsv3c.runtime.trt.build import BuildOptions, build_engines

    options = QuantizeOptions(weights=WeightScheme.TENSOR, activations=ActScheme.STATIC)
    quantize_folder(tiny_export, tmp_path / "q", options, calibrate=2)
    m = build_engines(
        tmp_path / "q",
        tmp_path / "e",
        BuildOptions(precision="fp8", roles=["decode"], target_cc=["8.9"], lower_for_trt=trt_lowering),
    )
    layers = m.engines["decode"].layers
    assert m.precision == "fp8" and layers.fp8_gemms and layers.fp8


def test_weight_only_block_fp8_builds(tiny_export: Path, tmp_path: Path) -> None:
    from dsv3c.runtime.trt.build import BuildOptions, build_engines

    fp8_export(tiny_export, tmp_path / "exp", block=32, static=False)  # tiny's widths are multiples of 32
    m = build_engines(
        tmp_path / "exp", tmp_path / "e", BuildOptions(roles=["decode"], target_cc=["8.9"], lowering="inline")
    )
    assert len(m.engines["decode"].layers.fp8_weight_gemms) == 21 and not m.engines["decode"].layers.fp8_gemms


def test_block_fp8_weights_with_fp8_activations_fail_clearly(tiny_export: Path, tmp_path: Path) -> None:
    from dsv3c.runtime.trt.build import BuildOptions, build_engines

    fp8_export(tiny_export, tmp_path / "exp", block=32, static=True)
    with pytest.raises(UserError, match=r"first block-scaled dequantization: node \d+ '.*/dq'.*cannot pair"):
        build_engines(
            tmp_path / "exp", tmp_path / "e", BuildOptions(roles=["decode"], target_cc=["8.9"], lowering="inline")
        )


def test_partial_fp8_blocks_name_the_node(tiny_export: Path, tmp_path: Path) -> None:
    from dsv3c.runtime.trt.build import BuildOptions, build_engines

    fp8_export(tiny_export, tmp_path / "exp", block=128, static=False)  # 128 does not divide tiny's 160 columns
    with pytest.raises(
        UserError, match=r"TensorRT cannot parse node \d+ 'model\.layers\.0\..*/dq' \(DequantizeLinear\)"
    ):
        build_engines(tmp_path / "exp", tmp_path / "e", BuildOptions(roles=["decode"], lowering="inline"))
    assert not (tmp_path / "e").exists()


def test_custom_node_without_body_is_named(tiny_export: Path, tmp_path: Path) -> None:
    from dsv3c.runtime.trt.build import BuildOptions, build_engines

    without_function_bodies(tiny_export, tmp_path / "exp")
    with pytest.raises(UserError, match=r"node \d+ 'layers\.0/node_mla_attention' \(dsv3c::MLAAttention\).*plugins"):
        build_engines(tmp_path / "exp", tmp_path / "e", BuildOptions(roles=["decode"], lowering="inline"))


# ---- the command line: one line, exit 2 -------------------------------------------------------------------


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    import dsv3c.cli.main as cli

    if "build" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, "build"])
    code = cli.main(["build", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "decode:past=8,4,16"], "need 0 <= min <= opt <= max"),
        (["--profile", "decode:pats=0,4,16"], "decode has no dimension or input 'pats'"),
        (["--profile", "seqq=1,2,3"], "no graph has a dimension or input 'seqq'"),
        (["--profile", "decode:past=1,2"], "expected [role:]name=min,opt,max"),
        (["--profile", "decode:past_ckv.0=1x0x32,1x1x32,1x9x32"], "shape must match"),
        (["--precision", "fp8"], "this export's graphs are fp32"),
        (["--target-cc", "9.0"], "unknown compute capability '9.0'"),
        (["--roles", "verify"], "no verify graph"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tiny_export: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    code, _, err = _cli(monkeypatch, capsys, str(tiny_export), "--out", str(tmp_path / "e"), *args)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "e").exists()


def test_cli_builds_one_role(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(
        monkeypatch,
        capsys,
        str(tiny_export),
        "--out",
        str(tmp_path / "e"),
        "--roles",
        "mtp",
        "--profile",
        "batch=1,2,4",
        "--target-cc",
        "8.9,12.0",
    )
    assert code == 0 and "mtp: built in" in out and "wrote" in out
    code, _, err = _cli(monkeypatch, capsys, str(tiny_export), "--out", str(tmp_path / "e"))
    assert code == 2 and "already exists" in err
