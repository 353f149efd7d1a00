"""Decode attention over the latent cache without copying it: the past and the new entries kept apart.

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

Measured (bench/attention_past_apart.py, `small` preset, batch 1, 2-core CPU,
bench/results/attention_past_apart_small_cpu_2026-12-02.json): the same speed at contexts 256 to 4096
(1.00-1.03x) and 1.12x at 16384. On that CPU absorbed MLA is bound by its GEMMs' arithmetic (about
4 x heads FLOPs per cache byte, bench/decode_attention.py), not by the bytes the Concat moves; a GPU, where
it is bound by bandwidth, is where the copy costs most (not measured yet: `--device cuda`).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from dsv3c.artifact.names import DOMAIN, MLA_OP
from dsv3c.export.functions import MLA_ATTRS, Body, absorbed_output, mla_mask_past, mla_prelude
from dsv3c.onnxkit.inline import inline_call
from dsv3c.passes.stages import DsPass, StageResult
from onnx import TensorProto, helper

INPUTS = ["q_nope", "q_pe", "past_ckv", "new_ckv", "past_kpe", "new_kpe", "wkv_b", "positions"]


def split_past_function(opset: int) -> onnx.FunctionProto:
    """Absorbed MLA over (past, new) caches given apart; output [B, S, H * v] as export/functions.py's body."""
    b = Body()
    m = mla_prelude(b, "past_ckv")
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
    absorbed_output(b, latent, probs, m)
    return helper.make_function(
        DOMAIN, MLA_OP, INPUTS, ["output"], b.nodes, [helper.make_opsetid("", opset)], attributes=MLA_ATTRS
    )


def _cache_parts(value: ir.Value | None, mla: ir.Node) -> tuple[ir.Node, ir.Value, ir.Value] | None:
    """(the Concat, past, new) when `value` is Concat(past, new) along the sequence, read by `mla` alone."""
    concat = value.producer() if value is not None else None
    if concat is None or concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx") or len(concat.inputs) != 2:
        return None
    axis = concat.attributes.get("axis")
    if axis is None or axis.as_int() != 1 or any(u.node is not mla for u in concat.outputs[0].uses()):
        return None
    past, new = concat.inputs
    return (concat, past, new) if past is not None and new is not None else None


def _absorbed(node: ir.Node) -> bool:
    a = node.attributes.get("absorbed")
    return a is not None and bool(a.as_int())


class SplitPastAttentionPass(DsPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        function = ir.serde.deserialize_function(split_past_function(model.opset_imports[""]))
        split = 0
        for mla in [n for n in graph if n.domain == DOMAIN and n.op_type == MLA_OP and _absorbed(n)]:
            ckv, kpe = _cache_parts(mla.inputs[2], mla), _cache_parts(mla.inputs[3], mla)
            if ckv is None or kpe is None:
                continue
            q_nope, q_pe, _, _, wkv_b, positions = mla.inputs
            call = ir.Node(
                DOMAIN,
                MLA_OP,
                [q_nope, q_pe, ckv[1], ckv[2], kpe[1], kpe[2], wkv_b, positions],
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
            inline_call(graph, call, function, origin=[mla, ckv[0], kpe[0]])
            for concat in (ckv[0], kpe[0]):
                graph.remove(concat, safe=True)
            split += 1
        return StageResult(model, bool(split), {"attention_past_apart": split})
