"""Who reads a value: what the passes' pattern matchers ask before they rewrite a chain of nodes."""

from __future__ import annotations

import onnx_ir as ir


def only_use(value: ir.Value | None) -> ir.Node | None:
    """The one node that reads `value`, when exactly one does and `value` is not a graph output (a chain
    whose values nothing else reads can be rewritten without changing what anything else computes)."""
    if value is None or value.is_graph_output():
        return None
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 else None
