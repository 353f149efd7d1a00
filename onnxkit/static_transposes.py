"""Transposes that move only dimensions of size 1, rewritten as Reshapes once a session fixes its shapes.

onnxruntime runs such a Transpose as a device-to-device copy (its output is laid out as its input), even
when free-dimension overrides make every size known. A decode step at one token per row has three per MLA
layer ([batch, 1, heads, d] <-> [batch, heads, 1, d] around the per-head GEMMs), which at q > 1 are real
transposes: the exported graph keeps them, and a session that fixes q = 1 (runtime/ort_cuda_graph.py) turns
them into Reshapes, which onnxruntime runs as a view. Same values, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from dsv3c.onnxkit.fixed_shapes import known_sizes
from onnx import ModelProto, NodeProto, TensorShapeProto, helper, numpy_helper


def reshape_of(sizes: Sequence[int], perm: Sequence[int]) -> list[int] | None:
    """The shape a Reshape needs to do what Transpose(perm) does to a tensor of `sizes`, or None where the
    transpose moves data: the dimensions larger than 1 must keep their order."""
    moved = [axis for axis in perm if sizes[axis] != 1]
    if moved != sorted(moved):
        return None
    return [sizes[axis] for axis in perm]


def transposes_as_reshapes(model: ModelProto, fixed: Mapping[str, int]) -> int:
    """Rewrite, in `model`'s main graph, every Transpose whose input shape is known (its declared shape, with
    the symbolic dimensions in `fixed` given their size) and whose permutation moves only dimensions of size
    1, as a Reshape to a constant shape. Returns how many were rewritten."""
    graph = model.graph
    shapes = {v.name: v.type.tensor_type.shape for v in [*graph.value_info, *graph.input, *graph.output]}
    nodes, rewritten = [], 0
    for node in graph.node:
        target = _reshape_target(node, shapes, fixed)
        if target is None:
            nodes.append(node)
            continue
        shape_name = f"{node.name or node.output[0]}/as_reshape_shape"
        graph.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), shape_name))
        nodes.append(
            helper.make_node("Reshape", [node.input[0], shape_name], list(node.output), name=f"{node.name}/as_reshape")
        )
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def _reshape_target(
    node: NodeProto, shapes: Mapping[str, TensorShapeProto], fixed: Mapping[str, int]
) -> list[int] | None:
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or node.input[0] not in shapes:
        return None
    known = known_sizes(shapes[node.input[0]].dim, fixed)
    if not known:
        return None
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(len(known)))[::-1])
    return reshape_of(known, perm) if perm != sorted(perm) else None  # an identity perm: left to onnxruntime
