"""DeepSeekMoE's shared experts, found next to a MoE node so that the ort lowering can run them as experts
of its com.microsoft::MoE (always chosen, weight 1) instead of as three MatMuls and a SwiGLU of their own.

The exporter writes the shared MLP as `down(silu(x Wg^T) * (x Wu^T))`, added to the MoE's output:

    h -> Reshape -> dsv3c::MoE -> Reshape --\\
    h -> MatMul(Transpose(Wg)) -> Sigmoid, Mul (SiLU) -> Mul <- MatMul(Transpose(Wu)) <- h
                                               -> MatMul(Transpose(Wd)) -> Add (the MoE's output + this)

A SwiGLU MLP of intermediate width n x ff is the sum of n MLPs of width ff over its units split in n
parts, and DeepSeek's shared width is n_shared_experts x moe_intermediate_size: so the shared MLP is n more
experts of the routed experts' shape. At decode on the H200, V2-Lite's shared MLP cost three GEMV kernels,
a Sigmoid, two Muls and the Add per layer (bench/gpu_step_kernels.py), for weights the MoE kernel can read
in the same grouped GEMM as the routed ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from dsv3c.export.builder import static_dims
from dsv3c.onnxkit.uses import only_use


@dataclass(frozen=True)
class SharedExperts:
    gate: ir.Value  # [n ff, D] float initializers, as torch stores them
    up: ir.Value
    down: ir.Value  # [D, n ff]
    count: int  # n: experts of the routed experts' width ff
    add: ir.Node  # MoE output + shared output
    moe_view: ir.Value  # the MoE's output reshaped back to the tokens' shape: what the Add's output becomes
    nodes: tuple[ir.Node, ...]  # the shared MLP's nodes (and their Transposes), removed once folded in

    def stacked(self, ff: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """gate, up [n, ff, D] and down [n, D, ff]: the n experts, as the routed ones are laid out."""
        g, u, d = (v.const_value.numpy() for v in (self.gate, self.up, self.down))  # type: ignore[union-attr]
        hidden = g.shape[1]
        return (
            g.reshape(self.count, ff, hidden),
            u.reshape(self.count, ff, hidden),
            np.ascontiguousarray(d.reshape(hidden, self.count, ff).transpose(1, 0, 2)),
        )


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.domain == "" and node.op_type == op else None


def _linear(value: ir.Value | None, x: ir.Value | None = None) -> tuple[ir.Node, ir.Node, ir.Value] | None:
    """(MatMul, Transpose, W) when `value` is MatMul(x, Transpose(W)) of an initializer W [out, in] read by
    nothing else (x: any input when None)."""
    matmul = _producer(value, "MatMul")
    if matmul is None or (x is not None and matmul.inputs[0] is not x):
        return None
    transpose = _producer(matmul.inputs[1], "Transpose")
    perm = transpose.attributes.get("perm") if transpose is not None else None
    if transpose is None or (perm is not None and tuple(perm.as_ints()) != (1, 0)):
        return None
    weight = transpose.inputs[0]
    if weight is None or not weight.is_initializer() or weight.const_value is None or len(weight.uses()) != 1:
        return None
    return matmul, transpose, weight


def find_shared_experts(moe: ir.Node, ff: int) -> SharedExperts | None:
    """The shared MLP added to `moe`'s output, reading the tokens the MoE reads, as experts of width `ff`;
    None where the graph is not that pattern (FP8 or 8-bit weights, no shared experts, another form)."""
    flatten = _producer(moe.inputs[0], "Reshape")
    if flatten is None or flatten.inputs[0] is None:
        return None
    h = flatten.inputs[0]
    view = only_use(moe.outputs[0])
    if view is None or view.op_type != "Reshape" or view.domain != "":
        return None
    add = only_use(view.outputs[0])
    if add is None or add.op_type != "Add" or add.domain != "":
        return None
    other = add.inputs[1] if add.inputs[0] is view.outputs[0] else add.inputs[0]
    down = _linear(other)
    if down is None or only_use(down[0].outputs[0]) is not add:
        return None
    product = _producer(down[0].inputs[0], "Mul")
    if product is None or only_use(product.outputs[0]) is not down[0]:
        return None
    for silu_value, up_value in ((product.inputs[0], product.inputs[1]), (product.inputs[1], product.inputs[0])):
        silu = _producer(silu_value, "Mul")
        up = _linear(up_value, h)
        if silu is None or up is None or only_use(silu.outputs[0]) is not product:
            continue
        sigmoid = next((n for n in (_producer(v, "Sigmoid") for v in silu.inputs) if n is not None), None)
        gate_value = sigmoid.inputs[0] if sigmoid is not None else None
        gate = _linear(gate_value, h)
        if sigmoid is None or gate is None or set(silu.inputs) != {gate_value, sigmoid.outputs[0]}:
            continue
        if len(gate[0].outputs[0].uses()) != 2 or only_use(up[0].outputs[0]) is not product:
            continue
        shapes = [static_dims(w.shape) for w in (gate[2], up[2], down[2])]
        width = shapes[0][0]
        if shapes[1] != shapes[0] or shapes[2] != (shapes[0][1], width) or width % ff:
            return None
        nodes = (down[0], down[1], product, silu, sigmoid, gate[0], gate[1], up[0], up[1])
        return SharedExperts(gate[2], up[2], down[2], width // ff, add, view.outputs[0], nodes)
    return None


def remove_shared(graph: ir.Graph, shared: SharedExperts) -> None:
    """The Add's output becomes the MoE's (now with the shared experts); the shared MLP goes."""
    ir.convenience.replace_all_uses_with(shared.add.outputs[0], shared.moe_view, replace_graph_outputs=True)
    graph.remove(shared.add, safe=True)
    graph.remove(list(shared.nodes), safe=True)
    for weight in (shared.gate, shared.up, shared.down):
        if weight.name is not None and weight.name in graph.initializers and not weight.uses():
            graph.initializers.pop(weight.name)
