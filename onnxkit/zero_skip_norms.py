"""RMSNorms of one row per token given to onnxruntime as its skip-RMSNorm with a zero skip, once a session
fixes their shapes.

onnxruntime's CUDA SimplifiedLayerNormalization runs its generic kernel (`cuApplyLayerNorm`: 3.4 us per
call at batch 1 on the H200, `bench/results/gpu_step_kernels_v2-lite_b1_h200_2026-12-04b.json`), while
SkipSimplifiedLayerNormalization runs a vectorized one (`SkipLayerNormKernelSmall`: 1.8 us for V2-Lite's
2048-wide hidden state, 1.7 us for its 512-wide latent, `gpu_step_kernels_v2-lite_b1_h200_2026-12-04e.json`).
A decode step has one such norm per MLA layer (the latent's kv_a_layernorm, and q_a_layernorm where the
model has a q_lora rank) and the first layer's input norm. Both kernels sum in float32 and x + 0 is x, so only the
reduction order can differ. The skip must have the input's last two sizes ([q, width], broadcast over the
batch), so the rewrite waits for a session that fixes q (runtime/ort_cuda_graph.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from dsv3c.onnxkit.fixed_shapes import known_sizes
from onnx import ModelProto, NodeProto, TensorProto, TypeProto, helper

MS_DOMAIN = "com.microsoft"
ELEMENT_BYTES: dict[int, int] = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2}


def _zeros(name: str, dtype: int, shape: list[int]) -> TensorProto:
    """Zeros of a float type as raw bytes (zero bits are 0 in each; numpy has no bfloat16)."""
    return helper.make_tensor(name, dtype, shape, vals=bytes(ELEMENT_BYTES[dtype] * math.prod(shape)), raw=True)


def norms_with_zero_skip(model: ModelProto, fixed: Mapping[str, int]) -> int:
    """Rewrite, in `model`'s main graph, every SimplifiedLayerNormalization over the last axis of a 3-d
    input of known last two sizes (with the symbolic dimensions in `fixed` given theirs), whose only used
    output is the normalized one, as com.microsoft::SkipSimplifiedLayerNormalization with a zero skip.
    Returns how many were rewritten."""
    graph = model.graph
    values = {v.name: v.type.tensor_type for v in [*graph.value_info, *graph.input, *graph.output]}
    read = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    nodes, rewritten = [], 0
    zeros: dict[tuple[int, ...], str] = {}
    for node in graph.node:
        skip_shape = _skip_shape(node, values, fixed, read)
        if skip_shape is None:
            nodes.append(node)
            continue
        dtype = values[node.input[0]].elem_type
        key = (dtype, *skip_shape)
        if key not in zeros:
            zeros[key] = f"zero_skip/{TensorProto.DataType.Name(dtype).lower()}_{'x'.join(map(str, skip_shape))}"
            graph.initializer.append(_zeros(zeros[key], dtype, skip_shape))
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        nodes.append(
            helper.make_node(
                "SkipSimplifiedLayerNormalization",
                [node.input[0], zeros[key], node.input[1]],
                [node.output[0]],
                name=f"{node.name}/zero_skip",
                domain=MS_DOMAIN,
                epsilon=epsilon,
            )
        )
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return rewritten


def _skip_shape(
    node: NodeProto, values: Mapping[str, TypeProto.Tensor], fixed: Mapping[str, int], read: set[str]
) -> list[int] | None:
    if node.op_type != "SimplifiedLayerNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    if any(name in read for name in node.output[1:]):  # its inv_std_var is used: keep the op that makes it
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    tensor = values.get(node.input[0])
    if tensor is None or tensor.elem_type not in ELEMENT_BYTES or len(tensor.shape.dim) != 3 or axis not in (-1, 2):
        return None
    return known_sizes(tensor.shape.dim[1:], fixed)  # [q, width]: the skip broadcasts over the batch
