"""What the exported folder holds: custom nodes with functions, latent cache I/O, shared weights, manifest."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import onnx
import pytest
from dsv3c.artifact.manifest import ManifestError, read_manifest
from dsv3c.artifact.weights import ALIGN, WEIGHTS_FILE
from dsv3c.export.onnx_ops import DOMAIN, register_schemas
from dsv3c.export.source import sha256_files
from dsv3c.models.config import DeepseekV3Config

from .test_export_common import Exported, exported_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return exported_tiny(tmp_path_factory)


def structure(tiny: Exported, role: str) -> onnx.ModelProto:
    return tiny.manifest.load_structure(role)


def custom_nodes(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node if n.domain == DOMAIN)


@pytest.mark.parametrize(("role", "absorbed"), [("prefill", 0), ("decode", 1), ("mtp", 1)])
def test_one_mla_node_per_layer_and_one_moe_node_per_moe_layer(tiny: Exported, role: str, absorbed: int) -> None:
    config = tiny.model.config
    model = structure(tiny, role)
    layers = 1 if role == "mtp" else config.num_hidden_layers
    moe_layers = 1 if role == "mtp" else sum(config.is_moe_layer(i) for i in range(layers))
    assert custom_nodes(model) == {"MLAAttention": layers, "MoE": moe_layers}
    functions = {(f.domain, f.name) for f in model.functions}
    assert functions == {(DOMAIN, "MLAAttention"), (DOMAIN, "MoE")}
    mla = [n for n in model.graph.node if n.op_type == "MLAAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mla[0].attribute}
    assert attrs["absorbed"] == absorbed and attrs["num_heads"] == config.num_attention_heads
    assert attrs["softmax_scale"] == pytest.approx(config.softmax_scale)
    # linears stay outside the custom nodes, as MatMuls that later passes can quantize
    assert sum(n.op_type == "MatMul" for n in model.graph.node) >= 6 * layers


def test_decode_cache_inputs_are_the_latent_only(tiny: Exported) -> None:
    config = tiny.model.config
    graph = structure(tiny, "decode").graph

    def shape(v: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    inputs, outputs = {v.name: shape(v) for v in graph.input}, {v.name: shape(v) for v in graph.output}
    assert inputs["input_ids"] == ["batch", "q"] and inputs["positions"] == ["batch", "q"]
    for i in range(config.num_hidden_layers):
        ckv, kpe = inputs[f"past_ckv.{i}"], inputs[f"past_kpe.{i}"]
        assert ckv == ["batch", "past", config.kv_lora_rank] and kpe == ["batch", "past", config.qk_rope_head_dim]
        assert ckv[2] + kpe[2] == config.kv_lora_rank + config.qk_rope_head_dim  # type: ignore[operator]
        assert outputs[f"new_ckv.{i}"] == ["batch", "q", config.kv_lora_rank]
    assert len(inputs) == 2 + 2 * config.num_hidden_layers
    assert tiny.manifest.cache.width == config.cache_width


def test_checker_and_shape_inference_understand_the_custom_ops(tiny: Exported) -> None:
    register_schemas()
    for role in ("prefill", "decode", "mtp"):
        onnx.checker.check_model(str(tiny.manifest.graph_path(role)), full_check=True)
    model = structure(tiny, "prefill")
    mla_out = next(n.output[0] for n in model.graph.node if n.op_type == "MLAAttention")
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    info = next(v for v in inferred.graph.value_info if v.name == mla_out)
    c = tiny.model.config
    dims = [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]
    assert len(dims) == 3 and dims[2] == c.num_attention_heads * c.v_head_dim  # [B, S, H * v]


def external(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    out = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in t.external_data}
            assert entries["location"] == WEIGHTS_FILE
            out[t.name] = (int(entries["offset"]), int(entries["length"]))
    return out


def test_weights_are_stored_once_for_all_graphs(tiny: Exported) -> None:
    prefill, decode, mtp = (external(structure(tiny, role)) for role in ("prefill", "decode", "mtp"))
    assert prefill == decode  # the same names at the same offsets
    assert not set(mtp) & set(prefill)  # MTP has its own weights (mtp.0.*)
    slots = sorted({**prefill, **mtp}.values())
    assert all(offset % ALIGN == 0 for offset, _ in slots)
    assert all(a[0] + a[1] <= b[0] for a, b in itertools.pairwise(slots))  # no overlap
    assert (tiny.out / WEIGHTS_FILE).stat().st_size == slots[-1][0] + slots[-1][1]
    stacked = [n for n in prefill if n.endswith("mlp.experts.gate_proj.weight")]
    assert len(stacked) == sum(tiny.model.config.is_moe_layer(i) for i in range(tiny.model.config.num_hidden_layers))


def test_manifest_describes_the_folder(tiny: Exported) -> None:
    m = read_manifest(tiny.out)
    assert m.weights == "checkpoint" and m.dtype == "float32" and m.opset == 21
    assert m.graphs == {"prefill": "prefill.onnx", "decode": "decode.onnx", "mtp": "mtp.onnx"}
    assert DeepseekV3Config.from_dict(m.config) == DeepseekV3Config.from_json(tiny.checkpoint / "config.json")
    stage = m.stages[0]
    assert stage["stage"] == "export" and stage["source_kind"] == "checkpoint"
    files = [tiny.checkpoint / f for f in stage["source_files"]]
    assert "config.json" in stage["source_files"] and any(f.suffix == ".safetensors" for f in files)
    assert stage["source_sha256"] == sha256_files(files, tiny.checkpoint)
    prefill = m.signatures["prefill"]
    assert [t.name for t in prefill.inputs] == ["input_ids", "positions"]
    assert prefill.outputs[0].shape == ["batch", "seq", tiny.model.config.vocab_size]
    assert m.signatures["decode"].inputs[2].name == "past_ckv.0"


def break_manifest(folder: Path, how: str) -> None:
    path = folder / "manifest.json"
    if how == "missing":
        path.unlink()
    elif how == "not json":
        path.write_text("{")
    else:
        raw = json.loads(path.read_text())
        if how == "version":
            raw["format_version"] = 99
        elif how == "no graphs":
            del raw["graphs"]
        elif how == "graph file gone":
            (folder / "decode.onnx").unlink()
        path.write_text(json.dumps(raw))


@pytest.mark.parametrize("how", ["missing", "not json", "version", "no graphs", "graph file gone"])
def test_read_manifest_rejects_bad_folders_in_one_line(tiny: Exported, tmp_path: Path, how: str) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("manifest.json", "prefill.onnx", "decode.onnx", "mtp.onnx"):
        (folder / name).write_bytes((tiny.out / name).read_bytes())
    (folder / WEIGHTS_FILE).touch()
    break_manifest(folder, how)
    with pytest.raises(ManifestError) as e:
        read_manifest(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)
