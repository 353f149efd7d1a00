"""What onnxruntime's com.microsoft::MoE and QMoE read as router_probs, and what their output is scaled by.

Both kernels take router_probs [N, E] (of their precision T), softmax each row over all E experts in
float32, pick the top k (ties: the kernel's order) and mix the chosen experts with those softmax
probabilities, renormalized over the k when normalize_routing_weights=1 (measured on the CPU kernel,
tests/test_passes_moe_router_inputs.py; on the CUDA kernel, bench/gpu_moe_routing.py).

**In the kernel** (DeepSeek-V2's routing: softmax scores, greedy top-k, no selection bias): that is
DeepSeek's own selection and weights, so the logits go in as they are and the routing runs inside the
kernel's one fused softmax-top-k. With n shared experts folded in as always-chosen experts
(passes/shared_experts.py), the routed part goes in as log-probabilities plus log s (s =
routed_scaling_factor) and the shared columns as 0: the kernel's softmax over the E + n columns is then
[s p_e, 1, ..., 1] / (s + n), every shared expert outranks every routed one (log s p_e < 0 when s p_e
< 1), and the output times s + n is sum_e s p_e y_e + sum y_shared. The factor goes into the experts'
down weights where the pass writes them (exact for bf16 weights and s + n = 3: a bf16 value times 3 has
at most 10 significant bits, which float16 holds), else into one Mul of the output. norm_topk_prob
models without shared experts in the kernel use normalize_routing_weights=1 and the factor s: the only
form QMoE takes, as its CPU kernel always renormalizes (RENORMALIZES_ALWAYS). A CUDA session, whose QMoE
honors normalize_routing_weights=0, moves QMoE's plain softmax routing into the kernel as it opens
(onnxkit/kernel_routing.py).

At decode on the H200 this replaces, per MoE layer, the graph's TopK, the scatter of the chosen weights
into a row (a copy and a scatter), Log, the weights' ReduceSum, its Cast and the Mul by it: 7 of a V2-Lite
step's kernels per layer (bench/gpu_step_kernels.py). One thing changes: DeepSeek ranks float32 scores,
the kernel ranks them after rounding to its precision (float16 for bf16 graphs). Rounding keeps the order
of unequal values or makes them equal, so the chosen set can differ only where two experts' scores fall
within one float16 step of each other at the k-th place, where the two carry nearly the same weight.
The weights themselves go through float16 in both forms (today's Log(R) is float16 too).

**In the graph** (every other variant: sigmoid scores, a selection bias, group-limited top-k, or
norm_topk_prob with shared experts): DeepSeek's routing as the canonical body computes it, R [N, E] with
the weights at the chosen experts and 0 elsewhere; router_probs = Log(R) (-inf where R = 0), so the kernel
picks exactly those experts and mixes them with R / sum(R), and the output times sum(R) restores
DeepSeek's scale (shared experts: R gains n columns of ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.export.builder import Builder
from dsv3c.export.functions import MOE_ATTRS, Body, moe_routing, moe_variant
from dsv3c.export.onnx_ops import DOMAIN
from dsv3c.onnxkit.inline import inline_call
from onnx import helper

MS_DOMAIN = "com.microsoft"
ROUTING_OP = "MoERouting"
# onnxruntime's CPU QMoE (1.32) renormalizes over the top k whatever normalize_routing_weights says
# (tests/test_passes_moe_router_inputs.py): a graph must compute the same on every provider, so QMoE takes
# the routing in the kernel only where DeepSeek renormalizes too (norm_topk_prob)
RENORMALIZES_ALWAYS = frozenset({"QMoE"})


def cast(b: Builder, value: ir.Value, have: ir.DataType | None, to: ir.DataType | None, name: str) -> ir.Value:
    """`value` (of dtype `have`) as `to`: itself when they agree."""
    if to is None or have == to:
        return value
    out: ir.Value = b.op("Cast", value, to=to, name=f"{name}_to_{to.name.lower()}")
    return out


def kernel_factor(moe: ir.Node, shared: int, kernel: str = "MoE") -> float | None:
    """The factor the kernel's output is multiplied by when the routing runs in `kernel` (`shared`:
    shared experts folded in as always-chosen ones); None where it must stay in the graph."""
    variant = moe_variant(ir.serde.serialize_node(moe))
    if variant.scoring_func != "softmax" or variant.grouped or variant.has_bias:
        return None
    if variant.normalize and shared:
        return None
    if kernel in RENORMALIZES_ALWAYS and not variant.normalize:
        return None
    scale = moe.attributes["routed_scaling_factor"].as_float()
    if shared and not 0.0 < scale <= 1.0:
        return None  # a shared column (0) must outrank log(s p_e) for every p_e < 1: s <= 1
    return scale + shared


@dataclass(frozen=True)
class RouterInputs:
    probs: ir.Value  # router_probs [N, E + shared] in the kernel's precision
    normalize: bool  # the kernel's normalize_routing_weights
    weight_sum: ir.Value | None  # in the graph: sum(R) [N, 1] as float32, to multiply the output by


def router_inputs(
    graph: ir.Graph,
    moe: ir.Node,
    b: Builder,
    opset: int,
    experts: int,
    shared: int,
    compute: ir.DataType,
    kernel: str = "MoE",
) -> RouterInputs:
    """router_probs for `moe`'s `kernel` (nodes in `b`, or inserted before `moe` for the graph's routing)."""
    x, router = moe.inputs[0], moe.inputs[1]
    assert x is not None and router is not None
    if kernel_factor(moe, shared, kernel) is None:
        r = routing(graph, moe, opset, b.rewrite if isinstance(b.rewrite, provenance.Rewrite) else None)
        if shared:
            r = with_shared_columns(b, r, experts, shared)
        probs = cast(b, b.op("Log", r, name="router_log"), ir.DataType.FLOAT, compute, "router_log")
        total = b.op("ReduceSum", r, b.ints(-1, name="axes"), keepdims=1, name="weight_sum")  # [N, 1]
        return RouterInputs(probs, True, total)
    f32 = ir.DataType.FLOAT
    weight = b.op("Transpose", cast(b, router, router.dtype, f32, "router"), perm=[1, 0], name="router_t")
    logits = b.op("MatMul", cast(b, x, x.dtype, f32, "router_x"), weight, name="router_logits")  # [N, E] f32
    normalize = moe_variant(ir.serde.serialize_node(moe)).normalize
    if shared:
        logits = b.op("LogSoftmax", logits, axis=-1, name="router_log_probs")
        scale = moe.attributes["routed_scaling_factor"].as_float()
        if scale != 1.0:
            logits = b.op("Add", logits, b.const(np.float32(math.log(scale)), name="log_scale"))
        pads = b.ints(0, 0, 0, shared, name="shared_pads")
        logits = b.op("Pad", logits, pads, b.const(np.float32(0.0), name="zero"), mode="constant", name="shared")
    return RouterInputs(cast(b, logits, f32, compute, "router_probs"), normalize, None)


def scaled_output(b: Builder, y: ir.Value, x: ir.Value, route: RouterInputs, factor: float) -> ir.Value:
    """The kernel's output `y` as DeepSeek's: times sum(R) (routing in the graph) or `factor` (1: as is)."""
    if route.weight_sum is not None:
        out: ir.Value = b.op("Mul", y, b.op("CastLike", route.weight_sum, x), name="scaled")
        return out
    if factor == 1.0:
        return y
    assert x.dtype is not None
    scaled: ir.Value = b.op("Mul", y, b.op("CastLike", b.const(np.float32(factor), name="factor"), x), name="scaled")
    return scaled


def routing_function(node: ir.Node, opset: int) -> ir.Function:
    """The canonical MoE body's routing for `node`'s variant, as a function x, router, bias -> R [N, E]."""
    variant = moe_variant(ir.serde.serialize_node(node))
    b = Body()
    moe_routing(b, variant)
    b.nodes[-1].output[0] = "output"
    proto = helper.make_function(
        DOMAIN,
        ROUTING_OP,
        ["x", "router", "bias"],
        ["output"],
        b.nodes,
        [helper.make_opsetid("", opset)],
        attributes=MOE_ATTRS,
    )
    return ir.serde.deserialize_function(proto)


def routing(graph: ir.Graph, moe: ir.Node, opset: int, rewrite: provenance.Rewrite | None = None) -> ir.Value:
    """Insert DeepSeek's routing for `moe` before it; returns R [N, E] (float32). Its nodes are marked as
    part of `rewrite` (default: the com.microsoft::MoE lowering) of `moe`."""
    inputs = list(moe.inputs[:3]) + [None] * max(0, 3 - len(moe.inputs))
    call = ir.Node(DOMAIN, ROUTING_OP, inputs, list(moe.attributes.values()), name=f"{moe.name}/routing")
    call.outputs[0].name = f"{moe.name}/routing"
    graph.insert_before(moe, call)
    rewrite = rewrite or provenance.lowered(f"{MS_DOMAIN}.MoE")
    _, outputs = inline_call(graph, call, routing_function(moe, opset), rewrite=rewrite, origin=moe)
    return outputs[0]


def with_shared_columns(b: Builder, r: ir.Value, experts: int, count: int) -> ir.Value:
    """R [N, E] -> [N, E + count] with ones in the new columns. R is the routing's scatter of the chosen
    weights into zeros (export/functions.py): scattered into a row of E zeros and `count` ones instead,
    which saves the zeros' fill and a Concat (two of the kernels a decode step launches per MoE layer)."""
    scatter = r.producer()
    fill = scatter.inputs[0].producer() if scatter is not None and scatter.inputs[0] is not None else None
    if scatter is None or scatter.op_type != "ScatterElements" or fill is None or fill.op_type != "ConstantOfShape":
        raise ir.passes.PreconditionError(f"bug: the routing of {b.prefix} is not a scatter into zeros")
    _, indices, updates = scatter.inputs
    assert indices is not None and updates is not None
    rows = b.op("Concat", b.op("Shape", indices, start=0, end=1), b.ints(experts + count, name="width"), axis=0)
    row = np.concatenate([np.zeros((1, experts), np.float32), np.ones((1, count), np.float32)], axis=1)
    base = b.op("Expand", b.const(row, name="shared_weights"), rows, name="shared_rows")
    out: ir.Value = b.op("ScatterElements", base, indices, updates, axis=1, name="with_shared")
    return out
