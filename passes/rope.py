"""DeepSeek's interleaved RoPE subgraph -> ONNX opset-23 `RotaryEmbedding` (TensorRT: a native rotary layer).

The exporter writes `apply_rope` (models/rope.py) as

    P = Reshape(x, [..., R/2, 2]);  a = Gather(P, 0, axis=-1);  b = Gather(P, 1, axis=-1)
    y = Reshape(Concat(Unsqueeze(a*cos - b*sin, -1), Unsqueeze(a*sin + b*cos, -1), axis=-1), shape of x)

with cos/sin [B, S, R/2] (unsqueezed over heads for x [B, S, H, R]). That is RotaryEmbedding with
interleaved=1 and the caches given per token: x [B, S, H, R] goes through its 3-D form [B, S, H * R]
with num_heads = H; the key's x [B, S, R] is one head. Pattern -> check -> rewrite: `match` says in
words why a candidate is not a rope, and the pass reports those reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.export.builder import Builder
from dsv3c.passes.stages import DsPass, StageResult

MIN_OPSET = 23


@dataclass(frozen=True)
class Rope:
    output: ir.Node  # the final Reshape
    x: ir.Value
    cos: ir.Value  # [B, S, R/2]
    sin: ir.Value


def _const_ints(value: ir.Value | None) -> list[int] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(v) for v in tensor.numpy().reshape(-1)]


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and node.domain == "" else None


def _half(mul: ir.Node | None) -> tuple[int, ir.Value, ir.Value] | None:
    """Mul(Gather(P, i, axis=-1), t) in either order -> (i, P, t)."""
    if mul is None or mul.op_type != "Mul":
        return None
    for this, other in ((0, 1), (1, 0)):
        gather = _producer(mul.inputs[this], "Gather")
        if gather is None or gather.inputs[0] is None or gather.inputs[0].shape is None:
            continue
        axis = gather.attributes.get("axis")
        rank = len(gather.inputs[0].shape)
        index = _const_ints(gather.inputs[1])
        if axis is not None and axis.as_int() in (-1, rank - 1) and index in ([0], [1]) and mul.inputs[other]:
            return index[0], gather.inputs[0], mul.inputs[other]  # type: ignore[return-value]
    return None


def _trig(value: ir.Value) -> ir.Value:
    """cos/sin [B, S, R/2] behind an Unsqueeze over the heads axis (or the value itself)."""
    unsqueeze = _producer(value, "Unsqueeze")
    return unsqueeze.inputs[0] if unsqueeze is not None and unsqueeze.inputs[0] is not None else value


def _stacked(value: ir.Value | None, op: str) -> ir.Node | None:
    """The `op` node behind Unsqueeze(op(...)), or None."""
    unsqueeze = _producer(value, "Unsqueeze")
    return _producer(unsqueeze.inputs[0], op) if unsqueeze is not None else None


def match(node: ir.Node) -> Rope | str:
    """A rope ending at `node` (a Reshape), or the reason it is not one."""
    if node.op_type != "Reshape":
        return "not a Reshape"
    concat = _producer(node.inputs[0], "Concat")
    if concat is None or len(concat.inputs) != 2:
        return "input is not a Concat of two"
    sub, add = _stacked(concat.inputs[0], "Sub"), _stacked(concat.inputs[1], "Add")
    if sub is None or add is None:
        return "Concat does not stack Unsqueeze(Sub) and Unsqueeze(Add)"
    terms = [_half(v.producer() if v is not None else None) for n in (sub, add) for v in n.inputs]
    if any(t is None for t in terms):
        return "Sub/Add terms are not Mul(Gather(pairs, 0|1), cos|sin)"
    (i0, p0, c), (i1, p1, s), (i2, p2, s2), (i3, p3, c2) = terms  # type: ignore[misc]
    if (i0, i1, i2, i3) != (0, 1, 0, 1) or len({p0, p1, p2, p3}) != 1 or c is not c2 or s is not s2:
        return "not a*cos - b*sin, a*sin + b*cos over one pair tensor"
    pairs = _producer(p0, "Reshape")
    x = pairs.inputs[0] if pairs is not None else None
    if x is None or x.shape is None or node.outputs[0].shape is None or len(x.shape) not in (3, 4):
        return "pairs are not a Reshape of a rank-3/4 tensor with a known shape"
    if not isinstance(x.shape[-1], int) or (len(x.shape) == 4 and not isinstance(x.shape[2], int)):
        return "rope width or head count is not static"
    if len(node.outputs[0].shape) != len(x.shape):
        return "the output is not reshaped back to the input's rank"
    return Rope(node, x, _trig(c), _trig(s))


class RopeToRotaryEmbeddingPass(DsPass):
    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 0) < MIN_OPSET:
            raise ir.passes.PreconditionError(f"RotaryEmbedding needs opset {MIN_OPSET}; upgrade the opset first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found = []
        for node in model.graph:
            if node.op_type == "Reshape":
                m = match(node)
                if isinstance(m, Rope):
                    found.append(m)
        for rope in found:
            self._rewrite(model.graph, rope)
        return StageResult(model, bool(found), {"rotary_embedding": len(found)})

    def _rewrite(self, graph: ir.Graph, rope: Rope) -> None:
        assert rope.x.shape is not None
        b = Builder(rope.output.name or "rope", rewrite=provenance.lowered("RotaryEmbedding"), origin=rope.output)
        width = rope.x.shape[-1]
        assert isinstance(width, int)
        if len(rope.x.shape) == 4:  # [B, S, H, R] -> [B, S, H * R] and back
            heads = rope.x.shape[2]
            assert isinstance(heads, int)
            flat = b.op("Reshape", rope.x, b.ints(0, 0, heads * width, name="flat"), name="flat")
            y = b.op("RotaryEmbedding", flat, rope.cos, rope.sin, interleaved=1, num_heads=heads, name="rotary")
            y = b.op("Reshape", y, b.ints(0, 0, heads, width, name="heads"), name="heads")
        else:
            y = b.op("RotaryEmbedding", rope.x, rope.cos, rope.sin, interleaved=1, num_heads=1, name="rotary")
        b.insert_before(graph, rope.output)
        old = rope.output
        ir.convenience.replace_nodes_and_values(
            graph, insertion_point=old, old_nodes=[old], new_nodes=[], old_values=old.outputs, new_values=[y]
        )
