"""dsv3c diff / inspect on pairs the real pipeline makes from one tiny export: export vs quantize (FP8 passes),
export vs lower portable, quantize vs lower ort. Every difference must be one of the pipeline's rewrites,
grouped per layer: quantized linears (weights + activations, or weight-only), lowered custom nodes, and the
cleanup's merged duplicates; nothing left as raw added/removed nodes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import onnx
import pytest
from dsv3c.cli import main as cli
from dsv3c.graph.diff import diff_paths
from dsv3c.graph.diff_types import DiffReport, GraphDiff, Rewrite
from dsv3c.graph.render_text import render_diff, render_inspect
from dsv3c.graph.summary import inspect_path
from dsv3c.onnxkit.linears import FP8_TYPES

from .fixtures.pipeline import PipelineFolders

ROLES = ["prefill", "decode", "mtp"]
ATTENTION = [
    "self_attn.q_a_proj",
    "self_attn.q_b_proj",
    "self_attn.kv_a_proj_with_mqa",
    "self_attn.kv_b_proj",
    "self_attn.o_proj",
]
DENSE = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
MOE = ["mlp.experts", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"]
WEIGHT_ONLY = {"self_attn.kv_b_proj", "mlp.experts"}  # read inside dsv3c::MLAAttention / dsv3c::MoE


@pytest.fixture(scope="module")
def folders(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> PipelineFolders:
    """The tiny export, its FP8 version, the export lowered to portable and trt, the FP8 version to ort and iree
    (each built on first use, tests/fixtures/pipeline.py)."""
    return PipelineFolders(tiny_export, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def quantized(folders: PipelineFolders) -> DiffReport:
    return diff_paths(folders["export"], folders["quantized"])


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(argv)
    return code, capsys.readouterr().out


def _only_rewrites(g: GraphDiff) -> None:
    """Nothing reported outside the rewrites: no raw node or initializer entries."""
    assert not g.nodes and not g.initializers, render_diff(DiffReport("a", "b", [g]))


def _fp8_weights(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {t.name for t in model.graph.initializer if t.data_type in FP8_TYPES}


def _scales(path: Path) -> dict[str, list[int]]:
    model = onnx.load(str(path), load_external_data=False)
    return {t.name: list(t.dims) for t in model.graph.initializer if t.name.endswith("_scale_inv")}


def test_export_vs_quantize_is_grouped_per_layer(quantized: DiffReport, folders: PipelineFolders) -> None:
    assert [g.role for g in quantized.graphs] == ROLES and not quantized.identical
    for g in quantized.graphs:
        _only_rewrites(g)
        assert not g.model  # the functions' bodies are unchanged (shape annotations aside)
        assert {r.kind for r in g.rewrites} <= {"quantized", "merged"}
        # every fp8 weight of the quantized graph belongs to exactly one reported linear
        weights = [w for r in g.rewrites for w in r.weights]
        assert sorted(weights) == sorted(_fp8_weights(folders["quantized"] / f"{g.role}.onnx"))
    prefill = quantized.graphs[0]
    targets = {
        layer: [r.target for r in prefill.rewrites if r.layer == layer and r.kind == "quantized"] for layer in (0, 1, 2)
    }
    assert targets[0] == ATTENTION + DENSE  # the dense layer
    assert sorted(targets[1]) == sorted(targets[2]) == sorted(ATTENTION + MOE)  # the MoE layers
    scales = _scales(folders["quantized"] / "prefill.onnx")
    for r in (r for r in prefill.rewrites if r.kind == "quantized"):
        assert r.label == "quantized (fp8, block 128)" and r.weight_dtype == "float8e4m3fn"
        assert r.weight_only == (r.target in WEIGHT_ONLY), r
        assert r.activation in ("", "fp8, 1x128 tiles (online)")
        assert sorted(r.changed_initializers) == sorted(r.weights)  # float -> fp8 under the same name
        assert r.scale_shapes == [scales[w + "_scale_inv"] for w in r.weights]
        assert r.added_initializers == sorted(w + "_scale_inv" for w in r.weights)
        assert any(n.endswith("/dequantize") for n in r.added_nodes)
    by_target = {(r.layer, r.target): r for r in prefill.rewrites}
    experts = by_target[1, "mlp.experts"]
    assert experts.op == "dsv3c::MoE" and [w.rsplit(".", 2)[-2] for w in experts.weights] == [
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert by_target[0, "self_attn.kv_b_proj"].op == "dsv3c::MLAAttention"
    q_a, kv_a = by_target[0, "self_attn.q_a_proj"], by_target[0, "self_attn.kv_a_proj_with_mqa"]
    assert any(n.endswith("/input/quantize") for n in q_a.added_nodes)  # the activation's Q/DQ: once, here
    assert kv_a.shared_activation == "self_attn.q_a_proj" and not any("/input/" in n for n in kv_a.added_nodes)
    # the cleanup's CSE merged shape computations of later layers into earlier ones: said so, per layer
    assert all(r.removed_nodes and "identical nodes" in r.target for r in prefill.rewrites if r.kind == "merged")


def test_quantize_text_and_json(folders: PipelineFolders, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = str(folders["export"]), str(folders["quantized"])
    code, text = _run_cli(["diff", a, b], capsys)
    assert code == 1
    assert "  layer 0:\n    quantized (fp8, block 128): 8 linears (7 with fp8 activations, 1 weight-only); " in text
    assert "  layer 1:\n    quantized (fp8, block 128): 9 linears (7 with fp8 activations, 2 weight-only); " in text
    assert re.search(
        r"self_attn\.kv_b_proj \(dsv3c::MLAAttention\): weight float8e4m3fn\[\d+, \d+\], "
        r"scale \[\d+, \d+\]; weight-only",
        text,
    )
    assert "mlp.experts (dsv3c::MoE): weights float8e4m3fn[" in text
    assert "activations fp8, 1x128 tiles (online), shares self_attn.q_a_proj's Q/DQ" in text
    assert not re.search(r"^\s+(added|removed|changed|renamed) ", text, re.MULTILINE), text
    # what ran, and which stage made each group, as the passes' provenance marks say
    assert "  stages (from the passes' provenance marks): fp8-weights, fp8-activations, " in text
    assert re.search(r"^    quantized \(fp8, block 128\): 8 linears .*\[by fp8-weights\]$", text, re.MULTILINE)
    out = tmp_path / "diff.json"
    code, _ = _run_cli(["diff", a, b, "--format", "json", "--out", str(out)], capsys)
    data = json.loads(out.read_text())
    assert code == 1 and data["identical"] is False and [g["role"] for g in data["graphs"]] == ROLES
    graph = data["graphs"][0]
    assert graph["nodes"] == [] and graph["initializers"] == []
    assert graph["stages"][:2] == ["fp8-weights", "fp8-activations"] and graph["stages"][-1] == "topological-sort"
    rows = {(r["layer"], r["target"]): r for r in graph["rewrites"]}
    assert rows[0, "self_attn.kv_b_proj"]["weight_only"] is True and rows[0, "self_attn.o_proj"]["weight_only"] is False
    assert rows[1, "mlp.experts"]["kind"] == "quantized" and len(rows[1, "mlp.experts"]["scale_shapes"]) == 3
    assert rows[0, "self_attn.o_proj"]["activation"] == "fp8, 1x128 tiles (online)"


def test_identical_folders(folders: PipelineFolders, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _run_cli(["diff", str(folders["quantized"]), str(folders["quantized"])], capsys)
    assert code == 0 and text.strip().endswith("no differences")


def test_structure_not_names(folders: PipelineFolders, tmp_path: Path) -> None:
    """Every node and every fp8 weight of the quantized graph renamed: the linears are still found, from the
    float -> fp8 initializers and the DequantizeLinear on their way to the MatMul/MLA/MoE reading them."""
    model = onnx.load(str(folders["quantized"] / "prefill.onnx"))
    names = {t.name: f"w{k}" for k, t in enumerate(model.graph.initializer) if t.data_type in FP8_TYPES}
    for t in model.graph.initializer:
        t.name = names.get(t.name, t.name)
    for k, node in enumerate(model.graph.node):
        node.name = f"n{k}"
        for i, x in enumerate(node.input):
            node.input[i] = names.get(x, x)
    onnx.save(model, tmp_path / "renamed.onnx")
    expected = diff_paths(folders["export"] / "prefill.onnx", folders["quantized"] / "prefill.onnx").graphs[0]
    (g,) = diff_paths(folders["export"] / "prefill.onnx", tmp_path / "renamed.onnx").graphs
    got = [(r.layer, r.target, r.label, r.weight_only, len(r.weights)) for r in g.rewrites if r.kind == "quantized"]
    assert got == [
        (r.layer, r.target, r.label, r.weight_only, len(r.weights)) for r in expected.rewrites if r.kind == "quantized"
    ]
    assert not g.initializers and {e.kind for e in g.nodes} == {"renamed"}  # the renames, and only them
    renamed = next(r for r in g.rewrites if r.target == "self_attn.o_proj")
    assert renamed.removed_initializers == ["model.layers.0.self_attn.o_proj.weight"]
    assert names["model.layers.0.self_attn.o_proj.weight"] in renamed.added_initializers


def test_lowered_portable(folders: PipelineFolders) -> None:
    report = diff_paths(folders["export"], folders["portable"])
    for g in report.graphs:
        _only_rewrites(g)
        assert {c.field for c in g.model} == {"opset dsv3c", "function dsv3c::MLAAttention", "function dsv3c::MoE"}
        lowered = [r for r in g.rewrites if r.kind == "lowered"]
        assert all(re.fullmatch(r"lowered \(inlined, \d+ nodes\)", r.label) for r in lowered)
        assert all(len(r.added_nodes) == int(r.label.split()[2]) for r in lowered)
    prefill = report.graphs[0]
    assert sorted((r.layer, r.op) for r in prefill.rewrites if r.kind == "lowered") == [
        (0, "dsv3c::MLAAttention"),
        (1, "dsv3c::MLAAttention"),
        (1, "dsv3c::MoE"),
        (2, "dsv3c::MLAAttention"),
        (2, "dsv3c::MoE"),
    ]


def test_lowered_to_onnxruntime_moe(folders: PipelineFolders, capsys: pytest.CaptureFixture[str]) -> None:
    report = diff_paths(folders["quantized"], folders["ort"])
    for g in report.graphs:
        _only_rewrites(g)
        moe = [r for r in g.rewrites if r.op == "dsv3c::MoE"]
        assert moe and all(r.label == "lowered (to com.microsoft::MoE)" for r in moe)
        mla = [r for r in g.rewrites if r.op == "dsv3c::MLAAttention"]
        assert mla and all(r.label.startswith("lowered (inlined, ") for r in mla)
    code, text = _run_cli(["diff", str(folders["quantized"]), str(folders["ort"])], capsys)
    assert code == 1 and "lowered (to com.microsoft::MoE): dsv3c::MoE layers.1/" in text
    assert re.search(r"lowered \(to com\.microsoft::MoE\): dsv3c::MoE layers\.1/.*\[by moe-to-com-microsoft\]", text)
    assert "  stages (from the passes' provenance marks): moe-to-com-microsoft, cache-in-place, inline-custom, " in text
    # export -> ort: quantized and lowered at once; the experts' fp8 weights now feed com.microsoft::MoE
    both = diff_paths(folders["export"] / "prefill.onnx", folders["ort"] / "prefill.onnx").graphs[0]
    _only_rewrites(both)
    kinds = {(r.kind, r.layer) for r in both.rewrites if r.kind != "merged"}
    # the final norm, outside the layers, is lowered too (fused, passes/ort_fusions.py)
    assert kinds == {(k, layer) for k in ("quantized", "lowered") for layer in range(3)} | {("lowered", None)}
    experts = next(r for r in both.rewrites if r.target == "mlp.experts" and r.layer == 1)
    assert experts.op == "dsv3c::MoE" and experts.weight_only and len(experts.weights) == 3


def test_lowered_for_tensorrt_and_iree(folders: PipelineFolders) -> None:
    trt = diff_paths(folders["export"] / "prefill.onnx", folders["trt"] / "prefill.onnx").graphs[0]
    _only_rewrites(trt)
    assert "opset ai.onnx" in {c.field for c in trt.model}
    labels = {(r.layer, r.op, r.label) for r in trt.rewrites if r.kind == "lowered"}
    for layer in range(3):
        assert (layer, "dsv3c::MLAAttention", "lowered (to Attention)") in labels
        assert (layer, "Reshape", "lowered (to RotaryEmbedding)") in labels  # the RoPE pattern, by its last node
    rope = next(r for r in trt.rewrites if r.label == "lowered (to RotaryEmbedding)")
    assert len(rope.removed_nodes) > 5  # the pattern's Gather/Mul/Sub/Add/Concat... went with it
    # iree: every blocked Q/DQ becomes a per-tensor one next to a Mul / Div by the expanded scales
    iree = diff_paths(folders["quantized"] / "prefill.onnx", folders["iree"] / "prefill.onnx").graphs[0]
    _only_rewrites(iree)
    model = onnx.load(str(folders["quantized"] / "prefill.onnx"), load_external_data=False)
    blocked = [
        n
        for n in model.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear")
        and any(a.name == "block_size" and a.i for a in n.attribute)
    ]
    rewritten = [r for r in iree.rewrites if r.label.startswith("lowered (blocked ")]
    assert sorted(r.target for r in rewritten) == sorted(n.name for n in blocked)
    assert {r.label for r in rewritten} == {
        "lowered (blocked DequantizeLinear as DequantizeLinear + Mul)",
        "lowered (blocked QuantizeLinear as Div + QuantizeLinear)",
    }


def test_numeric_export_vs_quantize(folders: PipelineFolders) -> None:
    (g,) = diff_paths(folders["export"] / "prefill.onnx", folders["quantized"] / "prefill.onnx", numeric=True).graphs
    n = g.numeric
    assert n is not None and n.status == "ok", n
    assert [e.layer for e in n.layers] == [0, 1, 2, None] and n.compared > 200
    assert all(1e-3 < e.max_rel < 2 for e in n.layers)  # fp8: percent-level per layer
    assert n.first_jump is not None and n.first_jump.layer == 0 and n.first_jump.max_rel > 1e-3
    # the first error is in layer 0's first linear: its dequantized weight, or what it computes
    assert n.first_jump.node.startswith("layers.0/") and n.first_jump.op in ("Transpose", "MatMul")
    assert {o.tensor for o in n.outputs} >= {"logits", "hidden"}
    text = render_diff(DiffReport("a", "b", [g]))
    assert re.search(r"numeric \(seed 0; inputs input_ids\[1, 4\], positions\[1, 4\]\): \d+ tensors compared", text)
    assert "    layer 0: max rel err " in text and "  first jump: layer 0, " in text


def test_inspect_fp8_coverage(folders: PipelineFolders) -> None:
    (before,) = [g for g in inspect_path(folders["export"]).graphs if g.role == "prefill"]
    (after,) = [g for g in inspect_path(folders["quantized"]).graphs if g.role == "prefill"]
    (ort,) = [g for g in inspect_path(folders["ort"]).graphs if g.role == "prefill"]
    # 3 layers: 8 + 10 + 10 linears (MoE router and experts included), and lm_head
    assert before.fp8.linears == after.fp8.linears == 29 and before.fp8.share == 0.0
    f = after.fp8
    assert (f.fp8_linears, f.weight_only) == (21, 5)  # kv_b_proj x3 and experts x2 are weight-only
    assert f.schemes == {"fp8, block 128": 26} and f.activations == {"fp8, 1x128 tiles (online)": 21}
    assert f.flops == pytest.approx(before.fp8.flops) and 0.3 < f.share < 0.9 and 0.05 < f.weight_only_share < 0.5
    flops, fp8, weight_only = _linear_flops(folders["export"])
    assert f.flops == pytest.approx(flops)
    assert f.share == pytest.approx(fp8 / flops) and f.weight_only_share == pytest.approx(weight_only / flops)
    assert "float8e4m3fn" in {r.dtype for r in after.by_dtype}
    text = render_inspect(inspect_path(folders["quantized"]))
    assert "21 of 29 linears in fp8 (activations fp8, 1x128 tiles (online): 21); 5 more with fp8 weights only" in text
    # what made the nodes, from the passes' marks: every node the export did not write is counted once
    assert before.stages == {} and "provenance:" not in render_inspect(inspect_path(folders["export"]))
    assert list(after.stages)[:2] == ["fp8-weights", "fp8-activations"] and after.stages["fp8-weights"] > 0
    names = {
        k: {n.name for n in onnx.load(str(folders[k] / "prefill.onnx"), load_external_data=False).graph.node}
        for k in ("export", "quantized")
    }
    assert sum(after.stages.values()) == len(names["quantized"] - names["export"])
    assert re.search(r"provenance: \d+ stages ran; nodes they made: fp8-weights \d+, fp8-activations \d+", text)
    # onnxruntime's lowering does not change what runs in fp8
    assert (ort.fp8.fp8_linears, ort.fp8.weight_only, ort.fp8.share) == (21, 5, pytest.approx(f.share))


def _linear_flops(export: Path) -> tuple[float, float, float]:
    """Linear FLOPs per token of the prefill graph, from its weights' shapes: (all, those the quantize pipeline
    runs in fp8, those it gives fp8 weights only: kv_b_proj, read inside MLAAttention, and the routed experts)."""
    from dsv3c.artifact.manifest import read_manifest

    top_k = int(read_manifest(export).config["num_experts_per_tok"])
    total = fp8 = weight_only = 0.0
    for name, dims in _dims(export / "prefill.onnx").items():
        if not name.endswith(".weight") or len(dims) < 2 or "embed_tokens" in name:
            continue
        flops = 2.0 * dims[-1] * dims[-2] * (top_k if len(dims) == 3 else 1)
        total += flops
        if "kv_b_proj" in name or ".mlp.experts." in name:
            weight_only += flops
        elif not (name == "lm_head.weight" or name.endswith("mlp.gate.weight")):  # the high-precision ones
            fp8 += flops
    return total, fp8, weight_only


def test_rewrite_lists_name_real_nodes(quantized: DiffReport, folders: PipelineFolders) -> None:
    """The nodes folded under each rewrite exist in B (added) or A (removed) and are not listed twice."""
    g = quantized.graphs[0]
    b = {n.name for n in onnx.load(str(folders["quantized"] / "prefill.onnx"), load_external_data=False).graph.node}
    a = {n.name for n in onnx.load(str(folders["export"] / "prefill.onnx"), load_external_data=False).graph.node}
    rewrites: list[Rewrite] = g.rewrites
    added = [n for r in rewrites for n in r.added_nodes]
    removed = [n for r in rewrites for n in r.removed_nodes]
    assert len(added) == len(set(added)) and set(added) <= b - a
    assert len(removed) == len(set(removed)) and set(removed) <= a - b
    assert len(added) == len(b - a)  # every node the passes added is explained by a rewrite


def _strip_marks(src: Path, dst: Path, rename: bool = False, keep: bool = False) -> Path:
    """A copy of the graph `src` without dsv3c's provenance marks (a graph dsv3c did not write); `rename`:
    every node renamed `n{k}`, so that names give no clue; `keep`: the marks kept."""
    model = onnx.load(str(src), load_external_data=False)
    for k, node in enumerate(model.graph.node):
        if rename:
            node.name = f"n{k}"
        if not keep:
            props = [p for p in node.metadata_props if not p.key.startswith("dsv3c.")]
            del node.metadata_props[:]
            node.metadata_props.extend(props)
    if not keep:
        props = [p for p in model.metadata_props if not p.key.startswith("dsv3c.")]
        del model.metadata_props[:]
        model.metadata_props.extend(props)
    onnx.save(model, dst)
    for location in {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}:
        shutil.copy(src.parent / location, dst.parent / location)  # the weights, beside it (not linked)
    return dst


def _summary(g: GraphDiff) -> list[tuple[object, ...]]:
    return sorted(
        (
            r.kind,
            -1 if r.layer is None else r.layer,  # outside the layers (the final norm): sorts with the others
            r.op,
            r.label,
            r.target,
            len(r.added_nodes),
            len(r.removed_nodes),
            r.activation,
        )
        for r in g.rewrites
    )


@pytest.mark.parametrize(("a", "b"), [("export", "quantized"), ("export", "portable"), ("quantized", "ort")])
def test_marks_and_structure_agree(folders: PipelineFolders, tmp_path: Path, a: str, b: str) -> None:
    """The diff reads the passes' provenance marks; on the same graph without them, structural inference
    (the fallback for graphs dsv3c did not write) reports the same rewrites."""
    path_a, path_b = folders[a] / "prefill.onnx", folders[b] / "prefill.onnx"
    assert any(n.metadata_props for n in onnx.load(str(path_b), load_external_data=False).graph.node)
    (marked,) = diff_paths(path_a, path_b).graphs
    (inferred,) = diff_paths(path_a, _strip_marks(path_b, tmp_path / "unmarked.onnx")).graphs
    _only_rewrites(marked)
    _only_rewrites(inferred)
    assert _summary(marked) == _summary(inferred)
    stages = {r.stage for r in marked.rewrites if r.kind == "lowered"}
    assert stages <= {"inline-custom", "moe-to-com-microsoft", "weights-transposed", "ort-fusions", "ort-rotary"} and (
        b == "quantized" or stages
    )
    assert {r.stage for r in inferred.rewrites} == {""}  # nothing to read: inferred


def test_marks_group_what_names_cannot(folders: PipelineFolders, tmp_path: Path) -> None:
    """Every node renamed: the inlined custom nodes are still grouped per origin, by their marks alone."""
    path_a, path_b = folders["export"] / "prefill.onnx", folders["portable"] / "prefill.onnx"
    (expected,) = diff_paths(path_a, path_b).graphs
    (renamed,) = diff_paths(path_a, _strip_marks(path_b, tmp_path / "renamed.onnx", rename=True, keep=True)).graphs
    lowered = [r for r in renamed.rewrites if r.kind == "lowered"]
    assert sorted((r.layer, r.op, r.label, r.target) for r in lowered) == sorted(
        (r.layer, r.op, r.label, r.target) for r in expected.rewrites if r.kind == "lowered"
    )
    assert all(r.stage == "inline-custom" for r in lowered)


def _dims(path: Path) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in onnx.load(str(path), load_external_data=False).graph.initializer}


@pytest.mark.parametrize("pair", [("export", "quantized"), ("weightless", "weightless-quantized")])
def test_quantized_linear_details(folders: PipelineFolders, pair: tuple[str, str]) -> None:
    """One linear's entry in full, with weights and for `--weights none` folders (structure only)."""
    a, b = (folders[x] / "prefill.onnx" for x in pair)
    (g,) = diff_paths(a, b).graphs
    _only_rewrites(g)
    assert {(r.layer, r.label) for r in g.rewrites if r.kind == "quantized"} == {
        (layer, "quantized (fp8, block 128)") for layer in range(3)
    }
    dims = _dims(b)
    rewrites = {(r.layer, r.target): r for r in g.rewrites}
    o_proj = rewrites[0, "self_attn.o_proj"]
    weight = "model.layers.0.self_attn.o_proj.weight"
    assert o_proj.changed_initializers == [weight]  # float -> fp8, same name
    assert o_proj.added_initializers == [weight + "_scale_inv"]
    assert {n.rsplit("/", 1)[-1] for n in o_proj.added_nodes} >= {"dequantize", "scale_expand", "quantize", "amax"}
    out, inp = dims[weight]
    scale = [-(-out // 128), -(-inp // 128)]
    assert (o_proj.op, o_proj.weight_shapes, o_proj.scale_shapes) == ("MatMul", [[out, inp]], [scale])
    assert o_proj.activation == "fp8, 1x128 tiles (online)" and not o_proj.weight_only
    assert o_proj.stage == "fp8-weights"
    experts, kv_b = rewrites[1, "mlp.experts"], rewrites[1, "self_attn.kv_b_proj"]
    assert experts.weight_only and kv_b.weight_only and experts.op == "dsv3c::MoE"
    names = [f"model.layers.1.mlp.experts.{p}_proj.weight" for p in ("gate", "up", "down")]
    assert experts.weights == names and experts.scale_shapes == [dims[w + "_scale_inv"] for w in names]
    text = render_diff(DiffReport("a", "b", [g]))
    assert f"self_attn.o_proj (MatMul): weight float8e4m3fn[{out}, {inp}], scale {scale}; activations fp8" in text
    assert "added" not in text.replace("+", "")


def test_numeric_lowering_is_exact(folders: PipelineFolders) -> None:
    """Inlining the custom nodes' bodies changes no number."""
    (g,) = diff_paths(folders["export"] / "prefill.onnx", folders["portable"] / "prefill.onnx", numeric=True).graphs
    n = g.numeric
    assert n is not None and n.status == "ok", n
    assert n.compared > 200 and n.first_jump is None
    assert all(e.max_rel == 0 for e in n.layers) and {o.tensor for o in n.outputs} >= {"logits", "hidden"}


def test_numeric_skipped_without_weights(folders: PipelineFolders) -> None:
    a, b = folders["weightless"] / "prefill.onnx", folders["weightless-quantized"] / "prefill.onnx"
    (g,) = diff_paths(a, b, numeric=True).graphs
    assert g.numeric is not None and g.numeric.status == "skipped"
    assert "no data for" in g.numeric.reason and "--weights none" in g.numeric.reason
    assert g.rewrites  # the structural diff still ran


def test_inspect_weight_only_fp8_is_not_counted_as_fp8(folders: PipelineFolders) -> None:
    """The fp8-weights stage alone: fp8 weights, no activation Q/DQ; the matmuls still run in high precision."""
    path = folders["weights-only"] / "prefill.onnx"
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path), load_external_data=False).graph.node)
    (s,) = inspect_path(path).graphs
    assert s.fp8.fp8_linears == 0 and s.fp8.weight_only == 26 and s.fp8.share == 0.0  # every linear the policy takes
    assert s.fp8.schemes == {"fp8, block 128": 26} and s.fp8.activations == {}
