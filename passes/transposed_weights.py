"""Float weights stored as their MatMul reads them: `MatMul(x, Transpose(W))` -> `MatMul(x, W_t)`.

The exporter keeps torch's [out, in] layout and transposes in the graph. onnxruntime folds that Transpose
at every session load, a copy of every dense weight per session: the `small` preset's decode took 0.75 s
to open, 0.38 s with the weights stored transposed (bench/session_load.py on the 2-core CPU,
bench/results/session_load_small_transposed_cpu_2026-12-02.json). The ort lowering writes `W_t = W.T`
once instead, named `<W>` + TRANSPOSED_SUFFIX and shared by every graph of the folder. The numbers do not
change: the MatMul reads the same values in the same layout onnxruntime made.

Only a float initializer directly behind the Transpose is stored transposed, or behind a Cast to another
float type, stored cast (the MoE router, which DeepSeek computes in float32: onnxruntime folded that Cast
at session load, as it folds the Transpose, so the step ran no Cast of it on the H200 before or after;
what storing it cast saves is the fold). FP8 weights keep their
8-bit bytes and their DequantizeLinear (transposing them would make a float copy, not save one);
8-bit lowerings have already turned these MatMuls into MatMulNBits.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.artifact.names import TRANSPOSED_SUFFIX
from dsv3c.export.builder import Builder, static_dims
from dsv3c.onnxkit.linears import LinearKind, rewritable_linears
from dsv3c.passes.lower_ort import FLOAT_NUMPY, folder_weight
from dsv3c.passes.stages import DsPass, StageResult


def _transposed(graph: ir.Graph, weight: ir.Value, to: ir.DataType | None = None) -> ir.Value:
    """W.T (cast to `to`, when given) as a weight of the folder (computed when written), made once per name."""
    assert weight.name is not None and weight.dtype is not None
    tensor = weight.const_value
    assert tensor is not None
    rows, cols = static_dims(weight.shape)
    dtype = to or weight.dtype
    suffix = TRANSPOSED_SUFFIX + ("" if dtype == weight.dtype else f"_{dtype.name.lower()}")
    return folder_weight(
        graph,
        weight.name + suffix,
        dtype,
        (cols, rows),
        lambda: ir.tensor(np.ascontiguousarray(tensor.numpy().T.astype(FLOAT_NUMPY[dtype]))),
    )


def _cast_to(value: ir.Value | None, weight: ir.Value) -> ir.DataType | None:
    """The float type `value` = Cast(weight) casts to; None when it is no such Cast."""
    cast = value.producer() if value is not None else None
    if cast is None or cast.op_type != "Cast" or cast.domain not in ("", "ai.onnx") or cast.inputs[0] is not weight:
        return None
    to = ir.DataType(cast.attributes["to"].as_int())
    return to if to in FLOAT_NUMPY else None


class TransposedWeightsPass(DsPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        stored: dict[str, None] = {}
        for use in rewritable_linears(graph):
            weight, matmul = use.weight, use.user
            transpose = matmul.inputs[1].producer() if matmul.inputs[1] is not None else None
            if use.kind != LinearKind.MATMUL or transpose is None:
                continue
            source = transpose.inputs[0]
            to = None if source is weight else _cast_to(source, weight)
            if source is not weight and to is None:
                continue  # not a plain float weight (FP8 behind its DequantizeLinear, ...)
            if weight.const_value is None or weight.dtype not in FLOAT_NUMPY:
                continue
            self._replace(graph, matmul, transpose, _transposed(graph, weight, to))
            cast = source.producer() if source is not weight and source is not None else None
            if cast is not None and not cast.outputs[0].uses():
                graph.remove(cast, safe=True)
            assert weight.name is not None
            stored[weight.name] = None
        for name in stored:  # the [out, in] original, unless something else still reads it
            value = graph.initializers[name]
            if not value.uses() and value not in graph.outputs:
                graph.initializers.pop(name)
        return StageResult(model, bool(stored), {"stored_transposed": len(stored)})

    def _replace(self, graph: ir.Graph, matmul: ir.Node, transpose: ir.Node, weight_t: ir.Value) -> None:
        if provenance.read(matmul).stage is not None:
            # made by an earlier stage (the MoE routing's router): that stage's rewrite explains it already
            matmul.replace_input_with(1, weight_t)
        else:  # the exporter's linear: a new MatMul, marked as replacing it and its Transpose, for `dsv3c diff`
            b = Builder(matmul.name or "matmul", rewrite=provenance.lowered("MatMul"), origin=[matmul, transpose])
            b.replace(graph, matmul, b.op("MatMul", matmul.inputs[0], weight_t, name="stored_transposed"))
        if not transpose.outputs[0].uses():
            graph.remove(transpose, safe=True)
