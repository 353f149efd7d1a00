"""Decode attention over the latent cache without copying it: the past and the new entries kept apart.

`lower --target ort --decode-cache apart` (the default writes the cache in place: ort_cache_in_place.py).

The exported decode step concatenates the whole past cache with the step's new entries
(`Concat(past_ckv, new_ckv)`, the same for the RoPE keys) and attends over the result. That Concat reads
and writes every cached byte once more per step, on top of the two reads attention needs (scores, then
values). This stage of the ort lowering inlines each absorbed dsv3c::MLAAttention whose cache inputs are
such Concats as the same absorbed attention over the two parts:

    s = [q_rows @ past_ckv^T + pe_rows @ past_kpe^T,  q_rows @ new_ckv^T + pe_rows @ new_kpe^T]  (scores, small)
    p = softmax(mask(s * scale))
    latent = p[..., :P] @ past_ckv + p[..., P:] @ new_ckv

Only the scores ([B, H*S, P+S], H/r of the cache's size) are concatenated. The same numbers up to the
summation order of the values' two parts. It costs five more small nodes per layer (the new entries' two
score GEMMs and their Add, the scores' Concat, a Split, their values GEMM and an Add, less the cache's
two Concats: `small`'s static decode step runs 574 nodes instead of 534), which a launch-bound step at
short context pays for. It applies to decode and the MTP modules (each over its own cache); prefill has no past. A past
of length 0 works too (the score and value GEMMs over it are empty).

Where kv_b_proj is a float weight, the body reads it as the two per-head weights it needs, written once
into the folder: w_uk [H, nope, r] and w_uv_t [H, r, v] (W_uv already transposed). Split from kv_b_proj in
the graph instead, onnxruntime folds that Split of a weight at every session load (V2-Lite's step on the
H200 ran as many Split kernels before as after, bench/results/gpu_step_kernels_v2-lite_b1_h200_2026-12-02b.json
and -02c.json): written once, no session spends the copy.

Measured (bench/attention_past_apart.py, `small` preset, batch 1, 2-core CPU,
bench/results/attention_past_apart_small_cpu_2026-12-02.json): the same speed at contexts 256 to 4096
(1.00-1.03x) and 1.12x at 16384. On that CPU absorbed MLA is bound by its GEMMs' arithmetic (about
4 x heads FLOPs per cache byte, bench/decode_attention.py), not by the bytes the Concat moves; a GPU, where
it is bound by bandwidth, is where the copy costs most (not measured yet: `--device cuda`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from dsv3c.artifact.names import DOMAIN, MLA_OP
from dsv3c.export.builder import static_dims
from dsv3c.export.functions import (
    MLA_ATTRS,
    Body,
    MlaPrelude,
    absorbed_output,
    mla_mask_past,
    mla_output,
    mla_prelude,
)
from dsv3c.onnxkit.inline import inline_call
from dsv3c.passes.lower_ort import float_initializer, folder_weight
from dsv3c.passes.stages import DsPass, StageResult
from onnx import TensorProto, helper

INPUTS = ["q_nope", "q_pe", "past_ckv", "new_ckv", "past_kpe", "new_kpe", "wkv_b", "positions"]


def per_head_prelude(b: Body, ckv: str = "past_ckv") -> MlaPrelude:
    """mla_prelude with kv_b_proj given per head (inputs w_uk [H, nope, r] and w_uv_t [H, r, v])."""
    q_nope, q_pe = b.t("q_nope", 0, 2, 1, 3), b.t("q_pe", 0, 2, 1, 3)
    scale = b.op("CastLike", b.attr("softmax_scale", onnx.AttributeProto.FLOAT), "q_nope")
    return MlaPrelude(b.shape(ckv, 2, 3), "w_uk", "w_uv_t", q_nope, q_pe, scale)


def split_past_function(opset: int, per_head_weights: bool = False) -> onnx.FunctionProto:
    """Absorbed MLA over (past, new) caches given apart; output [B, S, H * v] as export/functions.py's body.
    With `per_head_weights` its inputs take kv_b_proj as the two per-head weights the body reads."""
    b = Body()
    m = per_head_prelude(b) if per_head_weights else mla_prelude(b, "past_ckv")
    q_latent = b.op("MatMul", m.q_nope, m.w_k)  # [B, H, S, r]
    q_rows = b.op("Reshape", q_latent, b.op("Concat", b.shape("q_nope", 0, 1), b.ints(-1), m.rank, axis=0))
    pe_rows = b.op("Reshape", m.q_pe, b.op("Concat", b.shape("q_pe", 0, 1), b.ints(-1), b.shape("q_pe", 3, 4), axis=0))

    def scores(ckv: str, kpe: str) -> str:  # [B, H*S, len]
        return b.op("Add", b.op("MatMul", q_rows, b.t(ckv, 0, 2, 1)), b.op("MatMul", pe_rows, b.t(kpe, 0, 2, 1)))

    rows = b.op("Concat", scores("past_ckv", "past_kpe"), scores("new_ckv", "new_kpe"), axis=2)  # [B, H*S, T]
    head_shape = b.op("Concat", b.shape(q_latent, 0, 3), b.ints(-1), axis=0)
    scores_4d = b.op("Reshape", b.op("Mul", rows, m.scale), head_shape)  # [B, H, S, T]
    past, seq, batch = b.shape("past_ckv", 1, 2), b.shape("positions", 1, 2), b.shape("positions", 0, 1)
    mask = mla_mask_past(b, past, seq, batch, "positions")
    masked = b.op("Where", mask, b.op("Cast", scores_4d, to=TensorProto.FLOAT), b.scalar(float("-inf")))
    probs = b.op("CastLike", b.op("Softmax", masked, axis=-1), "q_nope")  # [B, H, S, T]
    prob_rows = b.op("Reshape", probs, b.op("Concat", b.shape(probs, 0, 1), b.ints(-1), b.shape(probs, 3, 4), axis=0))
    p_past, p_new = b.op("Split", prob_rows, b.op("Concat", past, seq, axis=0), axis=2, n_out=2)
    latent = b.op("Add", b.op("MatMul", p_past, "past_ckv"), b.op("MatMul", p_new, "new_ckv"))  # [B, H*S, r]
    if per_head_weights:
        heads = b.op("Reshape", latent, b.op("Concat", b.shape(probs, 0, 3), m.rank, axis=0))  # [B, H, S, r]
        mla_output(b, b.op("MatMul", heads, m.w_v))  # [B, H, S, r] @ [H, r, v]
    else:
        absorbed_output(b, latent, probs, m)
    inputs = [*INPUTS[:6], "w_uk", "w_uv_t", "positions"] if per_head_weights else INPUTS
    return helper.make_function(
        DOMAIN, MLA_OP, inputs, ["output"], b.nodes, [helper.make_opsetid("", opset)], attributes=MLA_ATTRS
    )


def per_head_weights(graph: ir.Graph, wkv_b: ir.Value | None, q_nope: ir.Value | None) -> list[ir.Value] | None:
    """kv_b_proj [H (nope + v), r] as w_uk [H, nope, r] and w_uv_t [H, r, v], weights of the folder
    (computed when written), when it is a float weight and the heads' shape is known; else None."""
    if wkv_b is None or q_nope is None or not float_initializer(wkv_b) or wkv_b.name is None:
        return None
    try:
        rows, rank = static_dims(wkv_b.shape)
        heads, nope = static_dims(ir.Shape(list(q_nope.shape or [])[2:]))
    except ValueError:
        return None
    if rows % heads or rows // heads <= nope:
        return None
    v, tensor, dtype = rows // heads - nope, wkv_b.const_value, wkv_b.dtype
    assert tensor is not None and dtype is not None

    def per_head() -> np.ndarray:
        return tensor.numpy().reshape(heads, nope + v, rank)

    return [
        folder_weight(graph, f"{wkv_b.name}.uk", dtype, (heads, nope, rank), lambda: ir.tensor(per_head()[:, :nope])),
        folder_weight(
            graph,
            f"{wkv_b.name}.uv",
            dtype,
            (heads, rank, v),
            lambda: ir.tensor(np.ascontiguousarray(per_head()[:, nope:].transpose(0, 2, 1))),
        ),
    ]


def cache_parts(value: ir.Value | None, mla: ir.Node) -> tuple[ir.Node, ir.Value, ir.Value] | None:
    """(the Concat, past, new) when `value` is Concat(past, new) along the sequence, read by `mla` alone."""
    concat = value.producer() if value is not None else None
    if concat is None or concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx") or len(concat.inputs) != 2:
        return None
    axis = concat.attributes.get("axis")
    if axis is None or axis.as_int() != 1 or any(u.node is not mla for u in concat.outputs[0].uses()):
        return None
    past, new = concat.inputs
    return (concat, past, new) if past is not None and new is not None else None


def absorbed_mla(node: ir.Node) -> bool:
    a = node.attributes.get("absorbed")
    return a is not None and bool(a.as_int())


class SplitPastAttentionPass(DsPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = model.opset_imports[""]
        functions = {given: ir.serde.deserialize_function(split_past_function(opset, given)) for given in (False, True)}
        split, given_per_head = 0, 0
        for mla in [n for n in graph if n.domain == DOMAIN and n.op_type == MLA_OP and absorbed_mla(n)]:
            ckv, kpe = cache_parts(mla.inputs[2], mla), cache_parts(mla.inputs[3], mla)
            if ckv is None or kpe is None:
                continue
            q_nope, q_pe, _, _, wkv_b, positions = mla.inputs
            weights = per_head_weights(graph, wkv_b, q_nope)
            kv_b: list[ir.Value | None] = [*weights] if weights is not None else [wkv_b]
            call = ir.Node(
                DOMAIN,
                MLA_OP,
                [q_nope, q_pe, ckv[1], ckv[2], kpe[1], kpe[2], *kv_b, positions],
                list(mla.attributes.values()),
                name=mla.name,
                num_outputs=1,
            )
            ir.convenience.replace_nodes_and_values(
                graph,
                insertion_point=mla,
                old_nodes=[mla],
                new_nodes=[call],
                old_values=mla.outputs,
                new_values=call.outputs,
            )
            inline_call(graph, call, functions[weights is not None], origin=[mla, ckv[0], kpe[0]])
            for concat in (ckv[0], kpe[0]):
                graph.remove(concat, safe=True)
            if weights is not None and wkv_b is not None and wkv_b.name is not None and not wkv_b.uses():
                graph.initializers.pop(wkv_b.name)
            split += 1
            given_per_head += weights is not None
        changes = {"attention_past_apart": split, "kv_b_per_head": given_per_head}
        return StageResult(model, bool(split), changes)
