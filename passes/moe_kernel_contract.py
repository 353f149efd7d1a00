"""The routing contract of onnxruntime's com.microsoft::MoE and QMoE that moe_router_inputs.py relies on,
as a graph to run and the answer to compare with: router_probs softmaxed over all E experts, the top k
mixed with those probabilities, renormalized over the k when normalize_routing_weights=1.

tests/test_passes_moe_router_inputs.py runs it on the CPU kernels, bench/gpu_moe_routing.py on the CUDA
ones. QMoE is compared with its own dequantized weights (its 8-bit path also rounds the activations to
int8 per block: about 1 %).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from dsv3c.passes.lower_ort_8bit import dequantize_rows, quantize_rows
from onnx import TensorProto, helper

EXPERTS, HIDDEN, FF, TOP_K, ROWS, BLOCK = 6, 64, 64, 2, 5, 32  # CUDA QMoE: hidden a multiple of 64
TYPES = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16)}


@dataclass(frozen=True)
class RoutingCase:
    model: bytes  # one MoE or QMoE node: inputs x [ROWS, HIDDEN], r [ROWS, EXPERTS]; output y
    feeds: dict[str, np.ndarray]
    want: np.ndarray  # y by hand, float64

    def error(self, got: np.ndarray) -> float:
        """max |got - want| / max |want|."""
        return float(np.abs(got.astype(np.float64) - self.want).max() / np.abs(self.want).max())


def routing_case(
    op: str, normalize: int, dtype: str, seed: int = 0, *, block: int = BLOCK, hidden: int = HIDDEN, ff: int = FF
) -> RoutingCase:
    """`op` ("MoE" or "QMoE") in `dtype` ("float32", "float16") with normalize_routing_weights=`normalize`
    (QMoE: 8-bit blocks of `block` values along K)."""
    rng = np.random.default_rng(seed)
    onnx_type, numpy_type = TYPES[dtype]
    # unit-variance outputs, within float16's range at any size
    fc1 = rng.standard_normal((EXPERTS, 2 * ff, hidden)) / np.sqrt(hidden)
    fc2 = rng.standard_normal((EXPERTS, hidden, ff)) / np.sqrt(ff)
    x = rng.standard_normal((ROWS, hidden))
    # router logits apart by at least 0.5, so that rounding to float16 ties no two experts
    r = np.stack([np.linspace(-2.0, 2.0, EXPERTS)[rng.permutation(EXPERTS)] for _ in range(ROWS)])
    r += rng.uniform(-0.1, 0.1, r.shape)
    attrs: dict[str, Any] = {"k": TOP_K, "activation_type": "swiglu", "swiglu_fusion": 1}
    attrs |= {"activation_alpha": 1.0, "activation_beta": 0.0, "normalize_routing_weights": normalize}
    if op == "MoE":
        weights = {"fc1": fc1.astype(numpy_type), "fc2": fc2.astype(numpy_type)}
        inputs = ["x", "r", "fc1", "", "fc2"]
    else:
        (q1, s1), (q2, s2) = quantize_rows(fc1, block), quantize_rows(fc2, block)
        fc1, fc2 = dequantize_rows(q1, s1, hidden), dequantize_rows(q2, s2, ff)
        weights = {"q1": q1.reshape(EXPERTS, 2 * ff, hidden), "s1": s1.astype(numpy_type)}
        weights |= {"q2": q2.reshape(EXPERTS, hidden, ff), "s2": s2.astype(numpy_type)}
        inputs = ["x", "r", "q1", "s1", "", "q2", "s2"]
        attrs |= {"expert_weight_bits": 8, "block_size": block, "quant_type": "int"}
    node = helper.make_node(op, inputs, ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node],
        "routing",
        [helper.make_tensor_value_info(n, onnx_type, s) for n, s in (("x", [ROWS, hidden]), ("r", [ROWS, EXPERTS]))],
        [helper.make_tensor_value_info("y", onnx_type, [ROWS, hidden])],
        [onnx.numpy_helper.from_array(w, n) for n, w in weights.items()],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)  # what onnxruntime 1.31 reads
    want = np.zeros((ROWS, hidden))
    for n in range(ROWS):
        p = np.exp(r[n] - r[n].max())
        p /= p.sum()  # the softmax over all experts
        top = np.argsort(-r[n])[:TOP_K]
        mix = p[top] / (p[top].sum() if normalize else 1.0)
        for e, weight in zip(top, mix, strict=True):
            h = fc1[e] @ x[n]
            g, u = h[0::2], h[1::2]  # gate and up rows interleaved (swiglu_fusion=1)
            want[n] += weight * (fc2[e] @ (g / (1 + np.exp(-g)) * u))
    feeds = {"x": x.astype(numpy_type), "r": r.astype(numpy_type)}
    return RoutingCase(model.SerializeToString(), feeds, want)
