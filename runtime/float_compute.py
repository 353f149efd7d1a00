"""Run a bfloat16 (or float16) graph in float32, for an onnxruntime provider whose kernels lack the half type.

onnxruntime's CPU provider has no bfloat16 kernels for most ops (MatMul, Softmax, com.microsoft::MoE), so a
bf16 export does not load there. This rewrite (of the session's in-memory copy; the folder is untouched)
keeps the weights as stored (16-bit in the file) and computes in float32: every half initializer is read
through a Cast to float32 (onnxruntime folds it once, at load), every Cast or Constant of a half type
becomes float32, and so do the graph's inputs and outputs (the runtime binds float32 buffers, the latent
cache included). The numbers are float32 arithmetic on the bf16 weights: within bf16 tolerance of the
torch bf16 model, which rounds after every op.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

HALF = (ir.DataType.BFLOAT16, ir.DataType.FLOAT16)


def _float_type(value: ir.Value) -> None:
    if value.dtype in HALF:
        value.type = ir.TensorType(ir.DataType.FLOAT)


def compute_in_float32(model: ir.Model) -> dict[str, int]:
    """Rewrite `model` in place (see the module docstring); returns what changed, counted."""
    graph = model.graph
    counts = {"weights_cast": 0, "casts_retargeted": 0, "io": 0}
    for init in list(graph.initializers.values()):
        if init.dtype not in HALF or not init.uses():
            continue
        users = list(init.uses())
        cast = ir.Node("", "Cast", [init], [ir.AttrInt64("to", ir.DataType.FLOAT)], name=f"{init.name}/to_float")
        cast.outputs[0].name = f"{init.name}/float"
        cast.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        cast.outputs[0].shape = init.shape
        for user, index in users:
            user.replace_input_with(index, cast.outputs[0])
        graph.append(cast)
        counts["weights_cast"] += 1
    for node in graph.all_nodes():
        counts["casts_retargeted"] += _retarget(node)
    for function in model.functions.values():
        for node in function:
            counts["casts_retargeted"] += _retarget(node)
    for value in [*graph.inputs, *graph.outputs]:
        if value.dtype in HALF:
            value.type = ir.TensorType(ir.DataType.FLOAT)
            counts["io"] += 1
    for node in graph.all_nodes():  # intermediate types are stale: onnxruntime infers them again
        for out in node.outputs:
            if out not in graph.outputs:
                _float_type(out)
    graph.sort()
    return counts


def _retarget(node: ir.Node) -> int:
    """Cast(to=half) -> Cast(to=float); Constant of a half tensor -> its float32 value."""
    if node.op_type == "Cast" and node.domain == "":
        to = node.attributes.get("to")
        if to is not None and ir.DataType(to.as_int()) in HALF:
            node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT)
            return 1
    if node.op_type == "Constant" and node.domain == "":
        value = node.attributes.get("value")
        if value is not None and value.type == ir.AttributeType.TENSOR and value.as_tensor().dtype in HALF:
            array = value.as_tensor().numpy().astype(np.float32)
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))
            return 1
    return 0
