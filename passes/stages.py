"""Named pipelines: an explicit list of (stage name, pass), run on every graph of an export folder.

Every pass follows onnx-ir's contract (`ir.passes.InPlacePass`: `requires()` checks preconditions, `call()`
returns `PassResult(model, modified)`). `run_pipeline` applies each stage to each graph role in order,
optionally writes the graph after every stage to `dump_dir/{role}/NN-{stage}.onnx` (weights declared,
no data), and returns one record per stage for the manifest: what changed in which graph.

Provenance is stamped here, once for every pass: each node a stage adds carries the stage's name
(`dsv3c.stage`, artifact/provenance.py), beside the rewrite and origin its pass's Builder wrote, and each
model lists the stages that ran on it, so that `dsv3c diff` reads what happened instead of inferring it.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir
from dsv3c import progress
from dsv3c.artifact import provenance
from dsv3c.artifact.export_folder import ExportGraphs, weights_declared
from dsv3c.errors import UserError

_STAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass
class StageResult(ir.passes.PassResult):
    """A PassResult that also says what the pass changed (a small summary recorded in the manifest)."""

    changes: dict[str, Any] = field(default_factory=dict)


class DsPass(ir.passes.InPlacePass):
    """An in-place dsv3c pass: `call` returns a StageResult."""


@dataclass(frozen=True)
class Stage:
    name: str  # lower-case words joined by '-': used in dump file names and the manifest
    pass_: ir.passes.PassBase
    roles: tuple[str, ...] | None = None  # None: every graph
    rewrite: str | None = None  # stamped on the nodes it adds that their pass did not mark (library passes)

    def __post_init__(self) -> None:
        if not _STAGE_NAME.match(self.name):
            raise ValueError(f"bug: stage name {self.name!r} is not lower-case-with-dashes")


@dataclass
class StageRecord:
    name: str
    pass_name: str
    modified: dict[str, bool] = field(default_factory=dict)  # role -> modified
    changes: dict[str, Any] = field(default_factory=dict)  # role -> the pass's own summary + op counts

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.name, "pass": self.pass_name, "modified": self.modified, "changes": self.changes}


def op_counts(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph)


def _delta(before: collections.Counter[str], after: collections.Counter[str]) -> dict[str, int]:
    return {op: after[op] - before[op] for op in sorted(set(before) | set(after)) if after[op] != before[op]}


def _changes(result: ir.passes.PassResult) -> dict[str, Any]:
    """What a dsv3c pass says it changed; nothing for a library pass (its op counts are recorded)."""
    return dict(result.changes) if isinstance(result, StageResult) else {}


def _stamp_added(model: ir.Model, before: set[ir.Node], stage: Stage) -> None:
    """Mark the nodes `stage` added (those not in `before`) with its name; the model records the stage."""
    for node in model.graph.all_nodes():
        if node not in before:
            provenance.stamp(node, stage=stage.name, rewrite=stage.rewrite)
    provenance.record_stage(model, stage.name)


def dump(model: ir.Model, path: Path) -> None:
    """The graph without weight data (weights declared as external data that is not written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with weights_declared(model):
        ir.save(model, path)


def run_pipeline(graphs: ExportGraphs, stages: Sequence[Stage], dump_dir: Path | None = None) -> list[StageRecord]:
    """Run `stages` in order on every graph; UserError (with the stage's name) when a precondition fails."""
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"bug: stage names repeat in {names}")
    if dump_dir is not None:
        for role, model in graphs.models.items():
            dump(model, dump_dir / role / "00-input.onnx")
    records = []
    with progress.task("passes", total=len(stages) * len(graphs.models)) as bar:
        for index, stage in enumerate(stages, start=1):
            records.append(_run_stage(graphs, stage, index, dump_dir, bar))
    return records


def _run_stage(
    graphs: ExportGraphs, stage: Stage, index: int, dump_dir: Path | None, bar: progress.Task
) -> StageRecord:
    record = StageRecord(stage.name, type(stage.pass_).__name__)
    for role, model in graphs.models.items():
        bar.update(description=f"pass {stage.name} on {role}")
        if stage.roles is not None and role not in stage.roles:
            bar.advance()
            continue
        before = op_counts(model)
        nodes_before = set(model.graph.all_nodes())
        try:
            result = stage.pass_(model)
        except ir.passes.PreconditionError as e:
            cause = e.__cause__ if e.__cause__ is not None else e
            raise UserError(f"stage '{stage.name}' cannot run on the {role} graph: {cause}") from None
        record.modified[role] = bool(result.modified)
        _stamp_added(model, nodes_before, stage)
        summary = _changes(result)
        ops = _delta(before, op_counts(model))
        if ops:
            summary["ops"] = ops
        if summary:
            record.changes[role] = summary
        if dump_dir is not None:
            dump(model, dump_dir / role / f"{index:02d}-{stage.name}.onnx")
        bar.advance()
    return record
