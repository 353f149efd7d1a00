"""One Shape node for graph inputs that are declared alike, so that what is computed from it is computed once.

Every layer of a decode step builds its attention mask from its own cache: `Shape(past_ckv.i)` gives the
number of past slots, and Range, Less, Expand and Concat turn it and the positions into the mask. The
inputs differ from layer to layer, so CSE cannot merge the chains, and onnxruntime launched the same four
kernels in every layer (27 times each per step of V2-Lite on the H200). But the inputs are declared with
the same shape (`[batch, past, 512]`: the same dim names mean the same sizes in ONNX), so their Shapes are
one value. This pass points each such Shape at the first input declared like it; the cleanup's CSE then
merges each layer's mask chain into one. Only the cache's inputs, fully declared (every dim a number or
a name), are read this way.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.export.builder import Builder
from dsv3c.passes.stages import DsPass, StageResult

CACHE_INPUTS = ("past_ckv.", "past_kpe.")


def _declared(value: ir.Value) -> tuple[int | str, ...] | None:
    """The input's declared dims, or None when any is unknown."""
    if value.shape is None:
        return None
    dims: list[int | str] = []
    for dim in value.shape:
        if isinstance(dim, int):
            dims.append(dim)
        elif isinstance(dim, ir.SymbolicDim) and dim.value:
            dims.append(dim.value)
        else:
            return None
    return tuple(dims)


class SharedInputShapesPass(DsPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        first: dict[tuple[int | str, ...], ir.Value] = {}
        moved = 0
        for value in model.graph.inputs:
            # the latent cache's inputs only: the ids and positions share their Shapes through the CSE already
            dims = _declared(value) if (value.name or "").startswith(CACHE_INPUTS) else None
            if dims is None:
                continue
            same = first.setdefault(dims, value)
            if same is value:
                continue
            for use in list(value.uses()):
                node = use.node
                if node.op_type == "Shape" and node.domain in ("", "ai.onnx") and node.graph is model.graph:
                    self._reread(model.graph, node, same)
                    moved += 1
        return StageResult(model, moved > 0, {"shapes_shared": moved})

    def _reread(self, graph: ir.Graph, shape: ir.Node, same: ir.Value) -> None:
        """A new Shape of `same` in place of `shape`, marked as its rewrite (for `dsv3c diff`)."""
        b = Builder(shape.name or "shape", rewrite=provenance.lowered("Shape"), origin=shape)
        attrs: dict[str, Any] = {k: a.as_int() for k, a in shape.attributes.items() if k in ("start", "end")}
        b.replace(graph, shape, b.op("Shape", same, name="shared", **attrs))
