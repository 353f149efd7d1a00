"""Provenance marks: what every dsv3c pass stamps on the nodes it creates, and how tools read them back.

A pass that creates a node says so on the node (as onnxscript's optimizer stamps
`pkg.onnxscript.optimizer.folded_from`), so that `dsv3c diff` and `dsv3c inspect` read what happened
instead of inferring it from the graph's shape. The marks are ONNX node `metadata_props` (string to
string), so they survive saving and loading and are visible in any ONNX viewer:

- `dsv3c.stage`: the pipeline stage that created the node (`fp8-weights`, `moe-to-com-microsoft`).
- `dsv3c.rewrite`: what the stage did, as `kind(detail, detail)`: `quantized(fp8, block 128)`,
  `lowered(com.microsoft.MoE)`, `inlined(dsv3c.MoE)`, `merged`, `folded`, `lifted` (an initializer made
  from a Constant: its marks are on the initializer's value).
- `dsv3c.origin`: the names of the node(s) the new node replaced or was derived from, one per line.
- `dsv3c.merged_from`: on a node a stage made, the duplicates the cleanup later merged into it, one per
  line (its own marks stay those of the stage that made it).

The model itself carries `dsv3c.stages` (the stage names that ran, one per line) so a reader can tell a
graph dsv3c wrote from a foreign one, and `dsv3c.marks`, the revision of these marks its stages wrote
(2: every merge is recorded, `merged_from` included; folders written before it carry none, and their
merges into stage-made nodes are found by structure, as then). A node keeps the marks of the stage that
created it: a later stage stamps only nodes that carry no stage yet.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx_ir as ir

STAGE = "dsv3c.stage"
REWRITE = "dsv3c.rewrite"
ORIGIN = "dsv3c.origin"
MERGED_FROM = "dsv3c.merged_from"
MODEL_STAGES = "dsv3c.stages"
MODEL_MARKS = "dsv3c.marks"
MARKS_REVISION = 2  # 2: merges into stage-made nodes are stamped (merged_from)
KEYS = (STAGE, REWRITE, ORIGIN, MERGED_FROM)

# The rewrite kinds the passes use; a reader treats any other kind as opaque text.
QUANTIZED = "quantized"
LOWERED = "lowered"
INLINED = "inlined"
MERGED = "merged"
FOLDED = "folded"
LIFTED = "lifted"
REWRITTEN = "rewritten"

_REWRITE = re.compile(r"^(?P<kind>[a-z][a-z0-9_-]*)(?:\((?P<details>.*)\))?$")


@dataclass(frozen=True)
class Rewrite:
    """`kind(detail, ...)`: what a stage did to make a node."""

    kind: str
    details: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(self.details)})" if self.details else self.kind

    @classmethod
    def parse(cls, text: str) -> Rewrite:
        """The inverse of `str`; text that does not follow the form is kept whole as the kind."""
        m = _REWRITE.match(text.strip())
        if m is None:
            return cls(text.strip())
        details = m.group("details")
        return cls(m.group("kind"), tuple(d.strip() for d in details.split(",")) if details else ())


def quantized(fmt: str, *details: str) -> Rewrite:
    return Rewrite(QUANTIZED, (fmt, *details))


def lowered(target_op: str) -> Rewrite:
    return Rewrite(LOWERED, (target_op,))


def inlined(custom_op: str) -> Rewrite:
    return Rewrite(INLINED, (custom_op,))


@dataclass(frozen=True)
class Provenance:
    """The marks of one node; `stage` None: no dsv3c pass created it."""

    stage: str | None = None
    rewrite: Rewrite | None = None
    origin: tuple[str, ...] = ()
    merged_from: tuple[str, ...] = ()  # duplicates merged into a node that keeps its stage's marks

    @property
    def stamped(self) -> bool:
        return self.stage is not None or self.rewrite is not None or bool(self.origin)


def origin_names(origin: ir.Node | str | Iterable[ir.Node | str]) -> tuple[str, ...]:
    """The names `origin` stands for: nodes by name (their op when unnamed), strings as they are."""
    items = [origin] if isinstance(origin, ir.Node | str) else list(origin)
    names = [(o.name or o.op_type) if isinstance(o, ir.Node) else o for o in items]
    return tuple(dict.fromkeys(n for n in names if n))


def stamp(
    node: ir.Node,
    *,
    stage: str | None = None,
    rewrite: Rewrite | str | None = None,
    origin: ir.Node | str | Iterable[ir.Node | str] = (),
    overwrite: bool = False,
) -> ir.Node:
    """Write the given marks on `node`; marks already there stay unless `overwrite`. Returns `node`."""
    meta = node.metadata_props
    for key, value in props(stage=stage, rewrite=rewrite, origin=origin).items():
        if overwrite or key not in meta:
            meta[key] = value
    return node


def props(
    *,
    stage: str | None = None,
    rewrite: Rewrite | str | None = None,
    origin: ir.Node | str | Iterable[ir.Node | str] = (),
) -> dict[str, str]:
    """The metadata_props entries for the given marks (those given only), for a node about to be made."""
    values = {
        STAGE: stage,
        REWRITE: None if rewrite is None else str(rewrite),
        ORIGIN: "\n".join(origin_names(origin)) or None,
    }
    return {key: value for key, value in values.items() if value is not None}


def read(node: ir.Node) -> Provenance:
    """The marks on `node` (an empty Provenance when it has none)."""
    return read_props(node.metadata_props)


def read_props(meta: Mapping[str, str]) -> Provenance:
    """The marks in a node's metadata_props, however it was read (onnx_ir, or protobuf entries as a dict)."""
    rewrite = meta.get(REWRITE)
    return Provenance(
        stage=meta.get(STAGE),
        rewrite=Rewrite.parse(rewrite) if rewrite else None,
        origin=_lines(meta.get(ORIGIN, "")),
        merged_from=_lines(meta.get(MERGED_FROM, "")),
    )


def _lines(text: str) -> tuple[str, ...]:
    return tuple(line for line in text.split("\n") if line)


def record_stage(model: ir.Model, stage: str) -> None:
    """Append `stage` to the model's list of stages that ran."""
    stages = model_stages(model)
    model.metadata_props[MODEL_STAGES] = "\n".join([*stages, stage])
    model.metadata_props[MODEL_MARKS] = str(MARKS_REVISION)


def merges_recorded(model: ir.Model) -> bool:
    """Whether the stages that wrote `model` recorded every merge they made (marks revision 2 or later)."""
    revision = model.metadata_props.get(MODEL_MARKS, "")
    return revision.isdigit() and int(revision) >= MARKS_REVISION


def model_stages(model: ir.Model) -> list[str]:
    """The stages dsv3c ran on `model`, in order; empty for a graph dsv3c did not transform."""
    return [line for line in model.metadata_props.get(MODEL_STAGES, "").split("\n") if line]


def has_provenance(model: ir.Model) -> bool:
    """Whether dsv3c's passes wrote this graph (it then explains itself; no structural inference needed)."""
    return bool(model_stages(model)) or any(STAGE in n.metadata_props for n in model.graph.all_nodes())
