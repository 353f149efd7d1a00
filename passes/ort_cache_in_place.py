"""Decode attention over a latent cache the step writes in place (`lower --target ort`, the default of
`--decode-cache`).

The exported decode step returns the step's new cache entries (`new_ckv.i` [B, S, r]) and attends over
`Concat(past, new)`, a copy of the cache per step; keeping the two apart (`--decode-cache apart`,
ort_split_past.py) costs five small nodes per layer instead: the new entries' score GEMMs and their Add,
the scores' Concat, a Split of the probabilities, their values GEMM and an Add. This stage writes the new
entries into the past buffer inside the graph and attends over that one buffer:

    present = ScatterElements(past, positions broadcast over the width, new, axis=1)   # slots positions[b, i]
    s = (q_rows @ present_ckv^T) * scale + (pe_rows @ present_kpe^T) * scale
    p = softmax(mask(s)) ; latent = p @ present_ckv

with slot j visible to new token i of row b iff j <= positions[b, i]. The graph's cache outputs become
`present_ckv.i` / `present_kpe.i` [B, P, *], the past with the new slots written. A runtime that binds each
present output onto its past input's buffer (runtime/ort_backend.py, runtime/ort_cuda_graph.py) gets the
write in place: onnxruntime's ScatterElements copies its input only when the output is another buffer
(CPU and CUDA), and the CUDA kernel takes its shapes by value, so the step stays capturable as a CUDA graph
(ScatterND copies its strides from pinned host memory at run time, which a captured replay would reread).
Unbound, onnxruntime returns the whole updated cache (a copy per step; correct, not fast).

Measured side by side against `apart` (`bash bench/decode_gpu.sh in-place 329cee6`, the H200,
bench/results/gpu_decode_v2-lite{,-cache-apart}_h200_2026-12-02g.json): V2-Lite bf16 1.07-1.09x
at batch 1 (4.90 -> 4.53 ms at context 128), 1.04-1.07x at batch 8, 1.02-1.10x at batch 32, contexts 128 to
16384; 1,537 -> 1,399 kernels per step. On the 2-core CPU (`python bench/attention_past_apart.py`, `small`)
1.01-1.02x.

The contract differs from the exported one (artifact/manifest.py: IN_PLACE_RULE): the past input must hold
more than max(positions) slots, and everything at slots > positions[b, i] is ignored. Positions past the
buffer are an error of onnxruntime's CPU kernel; on CUDA they are the caller's bug (the runtimes reserve
capacity first). The mask and the scatter's indices are built once per graph, not per layer. Prefill has
no past and keeps returning its new entries.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.artifact.names import DOMAIN, MLA_OP, PRESENT_PREFIXES
from dsv3c.export.builder import Builder, initializer
from dsv3c.export.functions import MLA_ATTRS, Body, absorbed_output, mla_output, mla_prelude
from dsv3c.onnxkit.inline import inline_call
from dsv3c.passes.ort_split_past import absorbed_mla, cache_parts, per_head_prelude, per_head_weights
from dsv3c.passes.stages import DsPass, StageResult
from onnx import TensorProto, helper

NEW_PREFIXES = dict(zip(("new_ckv.", "new_kpe."), PRESENT_PREFIXES, strict=True))


def in_place_function(opset: int, per_head_weights: bool = False) -> onnx.FunctionProto:
    """Absorbed MLA over one cache buffer (the step's entries already in it) and a given [B, 1, S, P] mask:
    inputs q_nope, q_pe, ckv, kpe, kv_b_proj (or w_uk, w_uv_t), visible -> output [B, S, H * v]."""
    b = Body()
    m = per_head_prelude(b, "ckv") if per_head_weights else mla_prelude(b, "ckv")
    q_latent = b.op("MatMul", m.q_nope, m.w_k)  # [B, H, S, r]
    q_rows = b.op("Reshape", q_latent, b.op("Concat", b.shape("q_nope", 0, 1), b.ints(-1), m.rank, axis=0))
    pe_rows = b.op("Reshape", m.q_pe, b.op("Concat", b.shape("q_pe", 0, 1), b.ints(-1), b.shape("q_pe", 3, 4), axis=0))
    # each GEMM scaled on its own, not their sum: onnxruntime folds a scalar Mul of a MatMul into the GEMM
    # (FusedMatMul's alpha, MatMulScaleFusion), so the scale costs no kernel
    latent_part = b.op("Mul", b.op("MatMul", q_rows, b.t("ckv", 0, 2, 1)), m.scale)
    rope_part = b.op("Mul", b.op("MatMul", pe_rows, b.t("kpe", 0, 2, 1)), m.scale)
    head_shape = b.op("Concat", b.shape(q_latent, 0, 3), b.ints(-1), axis=0)
    scores_4d = b.op("Reshape", b.op("Add", latent_part, rope_part), head_shape)  # [B, H, S, P]
    masked = b.op("Where", "visible", b.op("Cast", scores_4d, to=TensorProto.FLOAT), b.scalar(float("-inf")))
    probs = b.op("CastLike", b.op("Softmax", masked, axis=-1), "q_nope")  # [B, H, S, P]
    prob_rows = b.op("Reshape", probs, b.op("Concat", b.shape(probs, 0, 1), b.ints(-1), b.shape(probs, 3, 4), axis=0))
    latent = b.op("MatMul", prob_rows, "ckv")  # [B, H*S, r]
    if per_head_weights:
        heads = b.op("Reshape", latent, b.op("Concat", b.shape(probs, 0, 3), m.rank, axis=0))  # [B, H, S, r]
        mla_output(b, b.op("MatMul", heads, m.w_v))
    else:
        absorbed_output(b, latent, probs, m)
    weights = ["w_uk", "w_uv_t"] if per_head_weights else ["wkv_b"]
    inputs = ["q_nope", "q_pe", "ckv", "kpe", *weights, "visible"]
    return helper.make_function(
        DOMAIN, MLA_OP, inputs, ["output"], b.nodes, [helper.make_opsetid("", opset)], attributes=MLA_ATTRS
    )


class _Shared:
    """The nodes every layer of one graph shares, made once before the graph's first node: the mask over
    the buffer's P slots and the scatter's indices per cache width."""

    def __init__(self, graph: ir.Graph, positions: ir.Value, past: ir.Value, first: ir.Node):
        # constants as initializers of their own: as Constant nodes the CSE would merge them with equal
        # ones of the export, renaming those (which `dsv3c diff` would report)
        self.graph, self.positions, self.first = graph, positions, first
        b = Builder("cache_in_place", rewrite=provenance.lowered("in-place cache"))
        slots = b.op("Squeeze", b.op("Shape", past, start=1, end=2), self._ints("axes_0", 0))
        zero, one = self._ints("zero", 0, scalar=True), self._ints("one", 1, scalar=True)
        columns = b.op("Unsqueeze", b.op("Range", zero, slots, one), self._ints("axes_012", 0, 1, 2))  # [1,1,1,P]
        self.visible = b.op(
            "LessOrEqual", columns, b.op("Unsqueeze", positions, self._ints("axes_13", 1, 3)), name="visible"
        )  # [B, 1, S, P]
        b.insert_before(graph, first)
        self._indices: dict[int, ir.Value] = {}

    def indices(self, width: int) -> ir.Value:
        """positions [B, S] broadcast to [B, S, width] (ScatterElements' indices along the slots)."""
        if width not in self._indices:
            b = Builder(f"cache_in_place/indices_{width}", rewrite=provenance.lowered("in-place cache"))
            shape = b.op("Concat", b.op("Shape", self.positions), self._ints(f"width_{width}", width), axis=0)
            axes = self.graph.initializers.get("cache_in_place/axes_2") or self._ints("axes_2", 2)
            self._indices[width] = b.op("Expand", b.op("Unsqueeze", self.positions, axes), shape)
            b.insert_before(self.graph, self.first)
        return self._indices[width]

    def _ints(self, name: str, *values: int, scalar: bool = False) -> ir.Value:
        array = np.array(values[0] if scalar else values, dtype=np.int64)
        return initializer(self.graph, f"cache_in_place/{name}", ir.tensor(array))


def _width(value: ir.Value) -> int | None:
    dims = list(value.shape or [])
    return dims[2] if len(dims) == 3 and isinstance(dims[2], int) else None


def _present_name(new: ir.Value) -> str | None:
    """`present_ckv.i` for the graph output `new_ckv.i` (the same for kpe), else None."""
    name = new.name or ""
    return next((present + name[len(p) :] for p, present in NEW_PREFIXES.items() if name.startswith(p)), None)


class CacheInPlacePass(DsPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = model.opset_imports[""]
        functions = {given: ir.serde.deserialize_function(in_place_function(opset, given)) for given in (False, True)}
        outputs = {id(v): i for i, v in enumerate(graph.outputs)}
        shared: _Shared | None = None
        written = 0
        for mla in [n for n in graph if n.domain == DOMAIN and n.op_type == MLA_OP and absorbed_mla(n)]:
            ckv, kpe = cache_parts(mla.inputs[2], mla), cache_parts(mla.inputs[3], mla)
            if ckv is None or kpe is None:
                continue
            parts = [(past, new) for _, past, new in (ckv, kpe)]
            if not all(
                past.is_graph_input() and id(new) in outputs and _width(new) and _present_name(new)
                for past, new in parts
            ):
                continue  # the exported decode form: past cache inputs, new entries graph outputs
            q_nope, q_pe, _, _, wkv_b, positions = mla.inputs
            assert positions is not None
            if shared is None:
                shared = _Shared(graph, positions, parts[0][0], mla)
            b = Builder(mla.name or "mla", rewrite=provenance.lowered("in-place cache"), origin=[ckv[0], kpe[0]])
            present = []
            for past, new in parts:
                width = _width(new)
                assert width is not None
                value = b.op("ScatterElements", past, shared.indices(width), new, axis=1, name="write")
                value.name, value.shape, value.type = _present_name(new), past.shape, past.type
                present.append(value)
            b.insert_before(graph, mla)
            for (_, new), value in zip(parts, present, strict=True):
                graph.outputs[outputs[id(new)]] = value
            weights = per_head_weights(graph, wkv_b, q_nope)
            kv_b: list[ir.Value | None] = [*weights] if weights is not None else [wkv_b]
            call = ir.Node(
                DOMAIN,
                MLA_OP,
                [q_nope, q_pe, *present, *kv_b, shared.visible],
                list(mla.attributes.values()),
                name=mla.name,
                num_outputs=1,
            )
            ir.convenience.replace_nodes_and_values(
                graph, insertion_point=mla, old_nodes=[mla], new_nodes=[call], old_values=mla.outputs,
                new_values=call.outputs,
            )  # fmt: skip
            inline_call(graph, call, functions[weights is not None], origin=[mla, ckv[0], kpe[0]])
            for concat in (ckv[0], kpe[0]):
                graph.remove(concat, safe=True)
            if weights is not None and wkv_b is not None and wkv_b.name is not None and not wkv_b.uses():
                graph.initializers.pop(wkv_b.name)
            written += 1
        return StageResult(model, bool(written), {"cache_written_in_place": written})
