"""dsv3c diff reads what the cleanup merged into a node a stage made: such a survivor keeps its stage's marks and
names the duplicates it absorbed in `dsv3c.merged_from` (passes/merge_duplicates.py). For a graph dsv3c wrote
the marks alone decide; stripped of its marks, the structural replay gives the same answer. The FP8-checkpoint
export -> quantize pair is where stage-made survivors absorb duplicates (the quantizer's scale constants)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from dsv3c.artifact import provenance
from dsv3c.graph.diff import diff_paths
from dsv3c.graph.diff_types import GraphDiff, Rewrite

from .fixtures.pipeline import PipelineFolders


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`init --preset tiny --dtype fp8`, `export` (the checkpoint's FP8 kept), `quantize`."""
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder
    from dsv3c.models.checkpoint import init_random, save_model
    from dsv3c.models.config import DeepseekV3Config
    from dsv3c.passes.pipelines import QuantizeOptions
    from dsv3c.passes.quantize import quantize_folder

    root = tmp_path_factory.mktemp("fp8-pair")
    save_model(init_random(DeepseekV3Config.from_preset("tiny"), seed=0), root / "ckpt", dtype="fp8")
    export(from_folder(root / "ckpt"), root / "export", weights="checkpoint")
    quantize_folder(root / "export", root / "quantized", QuantizeOptions())
    return root / "export", root / "quantized"


def _edit_props(src: Path, dst: Path, drop: Callable[[str], bool]) -> Path:
    """A copy of an export folder whose nodes and model lost the metadata_props `drop` names."""
    shutil.copytree(src, dst)
    for path in dst.glob("*.onnx"):
        model = onnx.load(str(path), load_external_data=False)
        for props in [model.metadata_props, *(n.metadata_props for n in model.graph.node)]:
            kept = [p for p in props if not drop(p.key)]
            del props[:]
            props.extend(kept)
        onnx.save(model, str(path))
    return dst


def _merged(g: GraphDiff) -> list[Rewrite]:
    return [r for r in g.rewrites if r.kind == "merged"]


def _removed_duplicates(g: GraphDiff) -> set[str]:
    return {n for r in _merged(g) for n in r.removed_nodes}


def _merged_from(path: Path) -> set[str]:
    """The names the `merged_from` stamps of a graph file carry."""
    model = onnx.load(str(path), load_external_data=False)
    props = [p for n in model.graph.node for p in n.metadata_props if p.key == provenance.MERGED_FROM]
    return {name for p in props for name in p.value.split("\n")}


def test_the_fp8_checkpoint_pair_reads_merged_from_and_agrees_with_structure(
    fp8_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    export, quantized = fp8_pair
    marked = diff_paths(export, quantized)
    stripped = diff_paths(export, _edit_props(quantized, tmp_path / "stripped", lambda k: k.startswith("dsv3c.")))
    for g, s in zip(marked.graphs, stripped.graphs, strict=True):
        assert g.stages and not s.stages, g.role  # marks read for the first, structure for the second
        assert _merged(g) == _merged(s), g.role
    # the duplicates merged into a stage's node that the diff reports: the 16 merges that were inferred from
    # structure before the cleanup stamped them
    reported = [_merged_from(quantized / f"{g.role}.onnx") & _removed_duplicates(g) for g in marked.graphs]
    assert all(reported) and sum(map(len, reported)) >= 16


def test_without_merged_from_those_merges_are_not_reported(fp8_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """The diff takes the merges into a stage's node from the stamp alone: drop the stamp (every other mark kept)
    and exactly the duplicates it named are no longer merged."""
    export, quantized = fp8_pair
    marked = diff_paths(export, quantized).graphs[0]
    unstamped = diff_paths(export, _edit_props(quantized, tmp_path / "unstamped", provenance.MERGED_FROM.__eq__))
    assert unstamped.graphs[0].stages
    stamped = _merged_from(quantized / "prefill.onnx")
    changed = [r for r in _merged(marked) if r not in _merged(unstamped.graphs[0])]
    assert changed and all(set(r.removed_nodes) & stamped for r in changed)


@pytest.fixture(scope="module")
def folders(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> PipelineFolders:
    return PipelineFolders(tiny_export, tmp_path_factory.getbasetemp())


@pytest.mark.parametrize(("a", "b"), [("export", "trt")])
def test_marks_and_structure_agree_on_lowerings(folders: PipelineFolders, tmp_path: Path, a: str, b: str) -> None:
    marked = diff_paths(folders[a], folders[b])
    stripped = diff_paths(folders[a], _edit_props(folders[b], tmp_path / "stripped", lambda k: k.startswith("dsv3c.")))
    for g, s in zip(marked.graphs, stripped.graphs, strict=True):
        assert g.stages and not s.stages, g.role
        assert _merged(g) == _merged(s), g.role


def test_a_folder_written_before_merged_from_keeps_its_answer(fp8_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """A folder dsv3c wrote before the cleanup stamped `merged_from` has its stages but not the marks revision:
    its merges are found by structure, as they were then, so its diff does not change with this version."""
    export, quantized = fp8_pair
    new = diff_paths(export, quantized)
    old_keys = {provenance.MERGED_FROM, provenance.MODEL_MARKS}
    old = diff_paths(export, _edit_props(quantized, tmp_path / "old", old_keys.__contains__))
    for g, o in zip(new.graphs, old.graphs, strict=True):
        assert o.stages, o.role  # still a graph dsv3c wrote
        assert _merged(g) == _merged(o), g.role
