"""A softmax computed in float32 between Casts of a 16-bit graph -> the Softmax of the 16-bit tensor.

DeepSeek computes attention's softmax in float32 on bf16 scores and rounds the probabilities back
(`scores.softmax(dim=-1, dtype=torch.float32).type_as(x)`), so a bf16 or float16 export writes, per layer,

    p = Cast(Softmax(Where(visible, Cast(s, float32), -inf)), bf16)

onnxruntime's CUDA Softmax of a 16-bit tensor computes in float32 (its accumulation type for bf16 and
float16; the profile shows `softmax_warp_forward<BFloat16, BFloat16, float>`) and rounds once when it writes:

    p = Softmax(Where(visible, s, -inf))          # s, the fill and p in s's 16-bit type

The widening Cast is exact and Where only selects, so the two forms differ only in how the kernel reads and
reduces. Measured on the H200 (`python bench/gpu_half_softmax.py`, onnxruntime-gpu 1.31.1,
bench/results/gpu_half_softmax_h200_2026-12-03.json): rows up to 1024 long (the warp-wise kernel) give the
same bits; longer rows (the block-wise kernel, which sums in another order) differ in at most 29 of 2.1M
probabilities (bf16, 128 rows of 16384), each by one unit in the last place: far inside bf16's own rounding.
The two Casts go (two kernels per layer at decode, and at long context two passes over the float32 scores)
and Where and Softmax read and write 2 bytes, not 4. With passes/ort_rope_together.py, V2-Lite bf16 at
batch 1 runs 1.05-1.06x faster (1,399 -> 1,264 kernels per step; the numbers are in that module).
On the CPU, whose provider has no bf16 kernels, the runtime computes the graph in float32
(runtime/float_compute.py): there both forms compute the same float32 softmax.

The equivalence is the kernels' (onnxruntime's CUDA EP, and the float32 computation of CPU runs), not
ONNX's: a provider whose 16-bit Softmax rounds inside would differ. Only a fill exactly representable in
the 16-bit type is moved there (-inf is); only values read once between the Casts, none of them a graph
output, are rewritten (the probabilities may be one); graphs below opset 13 are left alone.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.export.builder import Builder
from dsv3c.onnxkit.uses import only_use
from dsv3c.passes.stages import DsPass, StageResult

HALF = {ir.DataType.BFLOAT16: ml_dtypes.bfloat16, ir.DataType.FLOAT16: np.float16}
REWRITE = provenance.lowered("Softmax")


def _cast_to(node: ir.Node | None, dtype: ir.DataType) -> bool:
    return node is not None and node.op_type == "Cast" and node.domain == "" and node.attributes["to"].as_int() == dtype


def _scalar(value: ir.Value | None) -> np.ndarray | None:
    """The value of a constant of one element (a Constant node's or an initializer's)."""
    if value is None:
        return None
    tensor = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        tensor = producer.attributes["value"].as_tensor()
    if tensor is None or tensor.size != 1:
        return None
    return tensor.numpy()  # its shape kept: Where broadcasts by it


def _fill_in(half: ir.DataType, fill: np.ndarray) -> np.ndarray | None:
    """`fill` in the 16-bit type, when that holds it exactly."""
    with np.errstate(over="ignore"):  # out of float16's range: inf, which the comparison refuses
        narrow = fill.astype(HALF[half])
    same = narrow.astype(np.float32) == fill.astype(np.float32)
    return narrow if bool(same) else None


class HalfSoftmaxPass(DsPass):
    """Cast(half -> float) [-> Where] -> Softmax -> Cast(-> half) -> Softmax (and Where) of the half tensor."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        rewritten = 0
        if model.opset_imports.get("", 0) < 13:  # Softmax over one axis (before 13: the trailing dims flattened)
            return StageResult(model, False, {})
        for softmax in [n for n in graph if n.op_type == "Softmax" and n.domain == ""]:
            rewritten += self._rewrite(graph, softmax)
        return StageResult(model, rewritten > 0, {"half_softmax": rewritten} if rewritten else {})

    def _rewrite(self, graph: ir.Graph, softmax: ir.Node) -> bool:
        x = softmax.inputs[0]
        if x is None or x.dtype != ir.DataType.FLOAT or only_use(x) is not softmax:
            return False
        where = x.producer()
        if where is None or where.op_type != "Where" or where.domain != "":
            where = None
        widened = where.inputs[1] if where is not None else x
        widen = widened.producer() if widened is not None else None
        if widen is None or only_use(widened) is not (where or softmax):
            return False
        half = widen.inputs[0].dtype if widen.inputs[0] is not None else None
        if half not in HALF or not _cast_to(widen, ir.DataType.FLOAT):
            return False
        narrow = only_use(softmax.outputs[0])
        if narrow is None or not _cast_to(narrow, half):
            return False
        fill = _scalar(where.inputs[2]) if where is not None else None
        fill_half = _fill_in(half, fill) if fill is not None else None
        if where is not None and fill_half is None:
            return False
        replaced = [widen, *([where] if where is not None else []), softmax, narrow]
        b = Builder(softmax.name or "softmax", rewrite=REWRITE, origin=replaced)
        scores = widen.inputs[0]
        if where is not None:
            fill_value = b.const(fill_half, dtype=HALF[half], name="fill")
            scores = b.op("Where", where.inputs[0], scores, fill_value, name="where")
            scores.type, scores.shape = narrow.outputs[0].type, where.outputs[0].shape
        attrs = {k: v.value for k, v in softmax.attributes.items()}  # the axis as it was (opset >= 13)
        probabilities = b.op("Softmax", scores, name="softmax", **attrs)
        b.replace(graph, narrow, probabilities)
        for node in replaced[:-1][::-1]:  # softmax, where, widen: read by nothing now
            graph.remove(node, safe=True)
        return True
