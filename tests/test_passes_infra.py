"""Pass infrastructure: reading/writing export folders, pipelines, dumps, cleanup, weightless folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from dsv3c.artifact import provenance
from dsv3c.artifact.export_folder import read_export, write_export
from dsv3c.artifact.manifest import read_manifest
from dsv3c.errors import UserError
from dsv3c.export.builder import Builder
from dsv3c.passes.cleanup import cleanup_stages
from dsv3c.passes.ort_run import GraphRunner, random_feeds
from dsv3c.passes.stages import DsPass, Stage, StageResult, run_pipeline

from .fixtures.exports import mini_export, weightless_copy


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mini_export(tmp_path_factory.getbasetemp())


def _outputs(folder: Path, role: str, seed: int = 0) -> dict[str, np.ndarray]:
    graphs = read_export(folder)
    feeds = random_feeds(graphs.manifest, role, np.random.default_rng(seed))
    return GraphRunner(graphs.models[role], folder).run(feeds)


def test_cleanup_roundtrip_keeps_numbers_and_one_weights_file(export_dir: Path, tmp_path: Path) -> None:
    graphs = read_export(export_dir)
    records = run_pipeline(graphs, cleanup_stages(), tmp_path / "dumps")
    out = tmp_path / "clean"
    write_export(graphs, out, {"stage": "cleanup", "changes": {r.name: r.changes for r in records}})
    # one weights file, every graph's weights point into it
    assert sorted(p.name for p in out.iterdir()) == [
        "decode.onnx",
        "manifest.json",
        "mtp.onnx",
        "prefill.onnx",
        "weights.bin",
    ]
    for role in ("prefill", "decode", "mtp"):
        proto = onnx.load(out / f"{role}.onnx", load_external_data=False)
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"weights.bin"}
        for name, a in _outputs(export_dir, role).items():
            np.testing.assert_allclose(_outputs(out, role)[name], a, rtol=1e-5, atol=1e-6)
    manifest = read_manifest(out)
    assert [s["stage"] for s in manifest.stages] == ["export", "cleanup"]
    assert manifest.signatures == read_manifest(export_dir).signatures
    # dumps: one file per stage and graph, named by stage, without weight data
    dumps = sorted(p.name for p in (tmp_path / "dumps" / "prefill").iterdir())
    assert (
        dumps[0] == "00-input.onnx"
        and dumps[-1].endswith("-topological-sort.onnx")
        and len(dumps) == 1 + len(cleanup_stages())
    )
    assert (tmp_path / "dumps" / "prefill" / dumps[-1]).stat().st_size < (out / "weights.bin").stat().st_size / 4


def test_weights_are_shared_between_graphs(export_dir: Path, tmp_path: Path) -> None:
    graphs = read_export(export_dir)
    write_export(graphs, tmp_path / "copy", {"stage": "copy"})
    offsets = {}
    for role in ("prefill", "decode"):
        proto = onnx.load(tmp_path / "copy" / f"{role}.onnx", load_external_data=False)
        offsets[role] = {t.name: [e.value for e in t.external_data] for t in proto.graph.initializer if t.external_data}
    shared = set(offsets["prefill"]) & set(offsets["decode"])
    assert "model.layers.0.self_attn.q_a_proj.weight" in shared
    assert all(offsets["prefill"][n] == offsets["decode"][n] for n in shared)


def test_weightless_folder_is_transformed_structurally(export_dir: Path, tmp_path: Path) -> None:
    src = weightless_copy(export_dir, tmp_path / "none")
    graphs = read_export(src)
    run_pipeline(graphs, cleanup_stages())
    write_export(graphs, tmp_path / "out", {"stage": "cleanup"})
    assert not (tmp_path / "out" / "weights.bin").exists()
    assert read_manifest(tmp_path / "out").weights == "none"
    model = ir.load(tmp_path / "out" / "prefill.onnx")
    weight = model.graph.initializers["model.layers.0.self_attn.q_a_proj.weight"]
    assert isinstance(weight.const_value, ir.ExternalTensor) and weight.const_value.shape.dims == (96, 160)


class _Refuses(DsPass):
    def requires(self, model: ir.Model) -> None:
        raise ir.passes.PreconditionError("this graph is not what the pass expects")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


def test_failed_precondition_is_a_user_error_naming_the_stage(export_dir: Path) -> None:
    with pytest.raises(UserError, match="stage 'refuse' cannot run on the prefill graph: this graph is not"):
        run_pipeline(read_export(export_dir), [Stage("refuse", _Refuses())])


def test_foreign_folders_are_rejected(export_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no manifest\.json"):
        read_export(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(UserError):
        read_export(bad)
    with pytest.raises(UserError, match="must differ"):
        write_export(read_export(export_dir), export_dir, {"stage": "x"}, force=True)


class _Negates(DsPass):
    """Negates the logits through a Builder: one Neg node, replacing nothing; says what it did."""

    def call(self, model: ir.Model) -> StageResult:
        logits = next(v for v in model.graph.outputs if v.name == "logits")
        producer = logits.producer()
        assert producer is not None
        b = Builder("negate", rewrite=provenance.Rewrite("rewritten", ("negated",)), origin=producer)
        out = b.op("Neg", logits, name="neg")
        b.insert_after(model.graph, producer)
        model.graph.outputs[model.graph.outputs.index(logits)] = out
        return StageResult(model, True, {"negated": 1})


def test_pipeline_records_changes_and_stamps_what_a_stage_adds(export_dir: Path) -> None:
    graphs = read_export(export_dir)
    before = {role: {n.name for n in m.graph} for role, m in graphs.models.items()}
    (record,) = run_pipeline(graphs, [Stage("negate-logits", _Negates(), roles=("prefill",))])
    assert record.modified == {"prefill": True}
    assert record.changes == {"prefill": {"negated": 1, "ops": {"Neg": 1}}}  # the StageResult's, and op counts
    prefill = graphs.models["prefill"]
    (neg,) = [n for n in prefill.graph if n.name not in before["prefill"]]
    producer = neg.inputs[0].producer() if neg.inputs[0] is not None else None
    assert producer is not None and provenance.read(neg) == provenance.Provenance(
        "negate-logits", provenance.Rewrite("rewritten", ("negated",)), (producer.name,)
    )
    assert not any(provenance.read(n).stamped for n in prefill.graph if n is not neg)
    assert provenance.model_stages(prefill) == ["negate-logits"]
    assert provenance.model_stages(graphs.models["decode"]) == []  # the stage did not run there
