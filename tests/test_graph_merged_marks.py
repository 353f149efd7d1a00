"""dsv3c diff reads what the cleanup merged from its marks (a survivor says `dsv3c.rewrite = merged` and names
the duplicates it absorbed in `dsv3c.origin`); a graph without marks gets the structural answer (common
subexpression elimination replayed over A). On the real pipeline's output both answers agree; moving a mark
moves the diff's answer, so the marks, not the structure, decide for a graph dsv3c wrote."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
from dsv3c.artifact import provenance
from dsv3c.graph.diff import diff_paths
from dsv3c.graph.diff_types import GraphDiff, Rewrite

from .fixtures.pipeline import PipelineFolders


@pytest.fixture(scope="module")
def folders(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> PipelineFolders:
    return PipelineFolders(tiny_export, tmp_path_factory.getbasetemp())


def _edit_graphs(src: Path, dst: Path, edit: object) -> Path:
    """A copy of an export folder whose graph files went through `edit(model)` (weights shared as they are)."""
    shutil.copytree(src, dst)
    for path in dst.glob("*.onnx"):
        model = onnx.load(str(path), load_external_data=False)
        edit(model)  # type: ignore[operator]
        onnx.save(model, str(path))
    return dst


def _strip(model: onnx.ModelProto) -> None:
    """Remove every dsv3c provenance mark: the graph as another tool would have written it."""

    def keep(props: object) -> None:
        kept = [p for p in props if not p.key.startswith("dsv3c.")]  # type: ignore[attr-defined]
        del props[:]  # type: ignore[attr-defined]
        props.extend(kept)  # type: ignore[attr-defined]

    keep(model.metadata_props)
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:
        keep(node.metadata_props)


def _merged(g: GraphDiff) -> list[Rewrite]:
    return [r for r in g.rewrites if r.kind == "merged"]


def _named_by_marks(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    names: set[str] = set()
    for node in model.graph.node:
        marks = provenance.read_props({p.key: p.value for p in node.metadata_props})
        if marks.rewrite is not None and marks.rewrite.kind == provenance.MERGED:
            names.update(marks.origin)
    return names


def test_marks_and_structure_agree_on_the_pipeline(folders: PipelineFolders, tmp_path: Path) -> None:
    export, quantized = folders["export"], folders["quantized"]
    marked = diff_paths(export, quantized)
    stripped = diff_paths(export, _edit_graphs(quantized, tmp_path / "stripped", _strip))
    assert len(marked.graphs) == len(stripped.graphs) == 3
    for g, s in zip(marked.graphs, stripped.graphs, strict=True):
        assert g.stages and not s.stages  # the first read from marks, the second inferred from structure
        assert _merged(g) == _merged(s), g.role
    prefill = marked.graphs[0]
    before = {n.name for n in onnx.load(str(export / "prefill.onnx"), load_external_data=False).graph.node}
    after = {n.name for n in onnx.load(str(quantized / "prefill.onnx"), load_external_data=False).graph.node}
    named = _named_by_marks(quantized / "prefill.onnx") & (before - after)  # export nodes the cleanup merged
    reported = {n for r in _merged(prefill) for n in r.removed_nodes}
    assert named and named <= reported


def test_moving_a_mark_moves_the_answer(folders: PipelineFolders, tmp_path: Path) -> None:
    """The survivor of `layers.1/node_Shape_4` is `layers.0/node_Shape_4`; marked on a node of layer 2 instead,
    the diff says the duplicate went into layer 2: it read the mark. Stripped, it says layer 0 again."""
    quantized = folders["quantized"]
    survivor, stand_in = "layers.0/node_Shape_4", "layers.2/node_pow_1"

    def move(model: onnx.ModelProto) -> None:
        nodes = {n.name: n for n in model.graph.node}
        if survivor not in nodes:
            return
        props, target = nodes[survivor].metadata_props, nodes[stand_in].metadata_props
        assert not [p for p in target if p.key.startswith("dsv3c.")]
        target.extend(p for p in props if p.key.startswith("dsv3c."))
        kept = [p for p in props if not p.key.startswith("dsv3c.")]
        del props[:]
        props.extend(kept)

    def target(report_b: Path, role: str = "prefill") -> str:
        g = next(g for g in diff_paths(folders["export"], report_b).graphs if g.role == role)
        return next(r.target for r in _merged(g) if "layers.1/node_Shape_4" in r.removed_nodes)

    assert target(quantized).endswith("identical nodes of layer 0")
    moved = _edit_graphs(quantized, tmp_path / "moved", move)
    assert target(moved).endswith("identical nodes of layers 0, 2")
    assert target(_edit_graphs(moved, tmp_path / "moved-stripped", _strip)).endswith("identical nodes of layer 0")
