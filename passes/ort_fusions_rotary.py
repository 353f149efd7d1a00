"""DeepSeek's interleaved RoPE subgraph -> onnxruntime's `com.microsoft::RotaryEmbedding` (CPU and CUDA kernels).

The exporter writes each rope as 13 nodes (passes/rope.py, whose matcher this uses); a decode step of the
`small` preset has 16 of them (q and k per layer). onnxscript's rotary fusion does not match it (it
looks for the half-split form with Slice). The ONNX opset-23 RotaryEmbedding that the trt lowering uses
would take our per-token cos/sin as they are, but needs opset 23 for the whole graph; the com.microsoft op
works at any opset but reads cos/sin from a cache [P, R/2] indexed by position ids [B, S]. So, once per
graph, the per-token cos/sin [B, S, R/2] become that cache, P = B * S rows, each token's id its own row:

    cos_cache = Reshape(cos, [-1, R/2]);  ids = Reshape(Range(0, B * S), [B, S])

(shape arithmetic only: with the static decode step's fixed dims onnxruntime folds it at load). The rope
on x [B, S, H, R] runs on the 3-D form [B, S, H * R] with num_heads = H; the key's x [B, S, R] is one head.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from dsv3c.artifact import provenance
from dsv3c.export.builder import Builder
from dsv3c.passes.lower_ort import MS_DOMAIN
from dsv3c.passes.rope import Rope, match
from dsv3c.passes.stages import DsPass, StageResult

REWRITE = provenance.lowered(f"{MS_DOMAIN}.RotaryEmbedding")

Caches = tuple[ir.Value, ir.Value, ir.Value]  # position ids, cos cache, sin cache


def _caches(graph: ir.Graph, rope: Rope, half: int) -> Caches:
    """The per-token cos/sin of `rope` as a cache and its row ids, inserted before the rope's output."""
    b = Builder(f"{rope.output.name or 'rope'}/rotary_cache", rewrite=REWRITE, origin=rope.output)
    rows = b.ints(-1, half, name="rows")
    cos, sin = (b.op("Reshape", t, rows, name=f"{w}_cache") for t, w in ((rope.cos, "cos"), (rope.sin, "sin")))
    cos.type, sin.type = rope.cos.type, rope.sin.type
    tokens = b.op("Shape", rope.cos, start=0, end=2, name="tokens")  # [B, S]
    count = b.op("ReduceProd", tokens, keepdims=0, name="count")
    ids = b.op("Range", b.const(0, name="zero"), count, b.const(1, name="one"), name="ids")
    positions = b.op("Reshape", ids, tokens, name="position_ids")
    positions.type = ir.TensorType(ir.DataType.INT64)
    b.insert_before(graph, rope.output)
    return positions, cos, sin


def _rewrite(graph: ir.Graph, rope: Rope, caches: Caches) -> None:
    assert rope.x.shape is not None
    b = Builder(rope.output.name or "rope", rewrite=REWRITE, origin=rope.output)
    width = rope.x.shape[-1]
    assert isinstance(width, int)
    positions, cos, sin = caches
    if len(rope.x.shape) == 4:  # [B, S, H, R] -> [B, S, H * R] and back
        heads = rope.x.shape[2]
        assert isinstance(heads, int)
        flat = b.op("Reshape", rope.x, b.ints(0, 0, heads * width, name="flat_shape"), name="flat")
        y = b.op("RotaryEmbedding", flat, positions, cos, sin, domain=MS_DOMAIN, interleaved=1, num_heads=heads)
        for value in (flat, y):  # no shape inference knows the com.microsoft op: say what it makes
            value.type, value.shape = rope.x.type, ir.Shape([*rope.x.shape[:2], heads * width])
        y = b.op("Reshape", y, b.ints(0, 0, heads, width, name="heads_shape"), name="heads")
    else:
        y = b.op("RotaryEmbedding", rope.x, positions, cos, sin, domain=MS_DOMAIN, interleaved=1, num_heads=1)
    b.insert_before(graph, rope.output)
    old = rope.output
    ir.convenience.replace_nodes_and_values(
        graph, insertion_point=old, old_nodes=[old], new_nodes=[], old_values=old.outputs, new_values=[y]
    )


class OrtRotaryPass(DsPass):
    """Every RoPE pattern -> com.microsoft::RotaryEmbedding."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        ropes = [m for node in graph if node.op_type == "Reshape" and isinstance(m := match(node), Rope)]
        caches: dict[tuple[ir.Value, ir.Value], Caches] = {}
        for rope in ropes:  # in graph order: the first rope of a cos/sin pair makes its cache, before itself
            width = rope.x.shape[-1] if rope.x.shape is not None else None
            assert isinstance(width, int)
            key = (rope.cos, rope.sin)
            if key not in caches:
                caches[key] = _caches(graph, rope, width // 2)
            _rewrite(graph, rope, caches[key])
        if ropes:
            common.RemoveUnusedNodesPass()(model)  # the patterns' other nodes: dead once their output is replaced
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return StageResult(model, bool(ropes), {"rotary_embedding": len(ropes)} if ropes else {})
