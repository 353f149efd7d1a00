"""The results of `dsv3c diff`, as dataclasses; render_text / render_json / render_html print them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dsv3c.graph.stats import TensorStats

EntryKind = Literal["added", "removed", "changed", "renamed"]
RewriteKind = Literal["quantized", "lowered", "merged", "folded"]


@dataclass
class Change:
    """One property that differs: `field` was `before` in A and is `after` in B."""

    field: str
    before: str
    after: str


@dataclass
class NodeChange:
    kind: EntryKind
    op: str
    name_a: str
    name_b: str
    layer: int | None
    matched_by: str = ""
    changes: list[Change] = field(default_factory=list)
    why: str = ""  # added/removed: why the matching found no partner, pass by pass


@dataclass
class InitializerChange:
    kind: EntryKind
    name_a: str
    name_b: str
    layer: int | None
    changes: list[Change] = field(default_factory=list)
    stats_a: TensorStats | None = None
    stats_b: TensorStats | None = None
    max_abs_diff: float | None = None


@dataclass
class Rewrite:
    """A change the pipeline makes on purpose, reported as one entry: a quantized linear, a lowered node,
    duplicates merged or nodes folded by the cleanup (graph/rewrites.py)."""

    kind: RewriteKind
    label: str  # "quantized (fp8, block 128)", "lowered (inlined, 41 nodes)", "lowered (to com.microsoft::MoE)"
    layer: int | None
    target: str  # the linear (short weight name), the lowered node, or what was merged / folded
    op: str  # the linear's op in A (MatMul, dsv3c::MoE, ...), the lowered node's op
    added_nodes: list[str] = field(default_factory=list)
    removed_nodes: list[str] = field(default_factory=list)
    added_initializers: list[str] = field(default_factory=list)
    removed_initializers: list[str] = field(default_factory=list)
    changed_initializers: list[str] = field(default_factory=list)
    # quantized only
    weights: list[str] = field(default_factory=list)  # the weight initializers ("old -> new" when renamed)
    weight_dtype: str = ""  # in B: float8e4m3fn
    weight_shapes: list[list[int]] = field(default_factory=list)  # in B, one per weight
    scale_shapes: list[list[int]] = field(default_factory=list)  # the stored scales, [] for a weight without
    activation: str = ""  # "fp8, 1x128 tiles (online)", ...; "" for a weight-only linear
    shared_activation: str = ""  # the linear whose activation Q/DQ this one reads too
    stage: str = ""  # the pipeline stage that made B's nodes, from their provenance marks ("" if unmarked)

    @property
    def weight_only(self) -> bool:
        return self.kind == "quantized" and not self.activation


@dataclass
class TensorError:
    tensor: str
    node: str
    op: str
    layer: int | None
    max_abs: float
    max_rel: float  # max |a - b| / max |a|


@dataclass
class LayerError:
    layer: int | None
    max_rel: float
    tensors: int
    worst: str


@dataclass
class NumericReport:
    status: Literal["ok", "skipped"]
    reason: str = ""
    seed: int = 0
    inputs: dict[str, list[int]] = field(default_factory=dict)
    compared: int = 0
    layers: list[LayerError] = field(default_factory=list)
    outputs: list[TensorError] = field(default_factory=list)  # the graph outputs
    first_jump: TensorError | None = None
    worst: list[TensorError] = field(default_factory=list)


@dataclass
class GraphDiff:
    role: str
    a: str
    b: str
    nodes_a: int
    nodes_b: int
    matched: dict[str, int] = field(default_factory=dict)
    model: list[Change] = field(default_factory=list)  # ir/opset/functions/inputs/outputs
    rewrites: list[Rewrite] = field(default_factory=list)
    nodes: list[NodeChange] = field(default_factory=list)
    initializers: list[InitializerChange] = field(default_factory=list)
    numeric: NumericReport | None = None
    stages: list[str] = field(default_factory=list)  # the pipeline stages between A and B, from B's marks

    @property
    def differences(self) -> int:
        return len(self.model) + len(self.rewrites) + len(self.nodes) + len(self.initializers)

    def entries(self) -> list[Rewrite | NodeChange | InitializerChange]:
        return [*self.rewrites, *self.nodes, *self.initializers]

    def layers(self) -> list[int | None]:
        """Every layer with an entry, in order, None (outside any layer) last."""
        seen = {e.layer for e in self.entries()}
        if self.numeric:
            seen |= {e.layer for e in self.numeric.layers}
        return sorted(x for x in seen if x is not None) + ([None] if None in seen else [])


@dataclass(frozen=True)
class LossDelta:
    """B against A on held-out text, as dsv3c eval measures it: the cost of the change, in loss."""

    tokens: int
    loss_a: float
    loss_b: float
    rel_loss_error: float
    top1_agreement: float
    kl_mean: float

    def line(self) -> str:
        return (
            f"loss on the text ({self.tokens} tokens): A {self.loss_a:.5f}, B {self.loss_b:.5f}: relative "
            f"{self.rel_loss_error:+.3e}, top-1 agreement {self.top1_agreement:.2%}, KL {self.kl_mean:.3e} nats/token"
        )


@dataclass
class DiffReport:
    a: str
    b: str
    graphs: list[GraphDiff] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)  # roles of an export folder present on one side only
    only_b: list[str] = field(default_factory=list)
    inputs: str = "seeded random"  # what --numeric fed the graphs: seeded random, or "text: PATH"
    loss: LossDelta | None = None  # B's loss on the text against A's (export folders with --data)

    @property
    def identical(self) -> bool:
        return not self.only_a and not self.only_b and all(g.differences == 0 for g in self.graphs)
