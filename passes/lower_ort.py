"""dsv3c::MoE -> onnxruntime's `com.microsoft::MoE` (CPU and CUDA kernels), its routing in the kernel
where DeepSeek's routing is the kernel's (V2's softmax top-k) and in the graph otherwise
(passes/moe_router_inputs.py):

    y = com.microsoft::MoE(x, router_probs, fc1, -, down, k=top_k, swiglu, swiglu_fusion=1)
    out = y * factor  (or y * sum(R) with the routing in the graph; the factor goes into fc2 when it can)

fc1 is [E, 2 ff, D] with gate and up rows interleaved (g0, u0, g1, u1, ...). For float expert weights it
is written as one weight, already interleaved and in the kernel's precision (fc2 too): built in the graph
instead, onnxruntime folds the interleave and the Casts at every session load (`bench/session_load.py`,
`small` preset, 2-core CPU: decode 7.0 s to load before, 0.84 s after; a bf16 V2-Lite took over 130 s
per session on the H200). FP8 expert weights stay FP8 in the file, so their DequantizeLinear and the
interleave stay in the graph. swiglu_fusion=1 and activation_alpha=1, activation_beta=0 are what the CPU
kernel implements (docs/toolchain.md).

Where the kernel runs in 16 bits (bf16 and float16 exports) and the weights are float, DeepSeekMoE's shared
experts join it (passes/shared_experts.py): fc1 and fc2 gain n experts after the E routed ones, always
chosen at weight 1, and k becomes top_k + n, so out = sum_routed w_e y_e + y_shared, what the MoE plus the
shared MLP computed. The shared MLP's MatMuls, SiLU and the Add of the two are gone (on the GPU, several
launches per layer at decode).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.artifact.export_folder import mark_weight
from dsv3c.export.builder import Builder, initializer, static_dims
from dsv3c.export.onnx_ops import DOMAIN, MOE_OP
from dsv3c.onnxkit.linears import MOE_EXPERT_INPUTS
from dsv3c.passes.moe_router_inputs import MS_DOMAIN, cast, kernel_factor, router_inputs, scaled_output
from dsv3c.passes.shared_experts import SharedExperts, find_shared_experts, remove_shared
from dsv3c.passes.stages import DsPass, StageResult

__all__ = ["MS_DOMAIN", "LowerMoEToOrtPass", "cast"]


def expert_shape(value: ir.Value) -> tuple[int, int, int]:
    known = value.shape
    producer = value.producer()
    if known is None and producer is not None and producer.domain == "" and producer.op_type == "DequantizeLinear":
        # an FP8 checkpoint's experts reach the MoE through DequantizeLinear, whose output the export leaves
        # without a shape: it is the shape of the e4m3 tensor it dequantizes
        known = producer.inputs[0].shape if producer.inputs[0] is not None else None
    shape = static_dims(known)
    if len(shape) != 3:
        raise ir.passes.PreconditionError(f"expert weights {value.name} have shape {list(shape)}, not [E, out, in]")
    return shape[0], shape[1], shape[2]


def kernel_dtype(dtype: ir.DataType | None) -> ir.DataType:
    """The precision com.microsoft::MoE runs in for activations of `dtype`: float32 and float16 as they are;
    bfloat16 in float16 (onnxruntime-gpu 1.31 registers no bfloat16 MoE kernel: a bf16 MoE fails at load
    with "Type parameter (T) of Optype (MoE) bound"). The weights' Casts are folded once, at session load."""
    return dtype if dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16) else ir.DataType.FLOAT16


FLOAT_NUMPY = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: ml_dtypes.bfloat16}


def float_initializer(value: ir.Value) -> bool:
    return value.is_initializer() and value.const_value is not None and value.dtype in FLOAT_NUMPY


def folder_weight(graph: ir.Graph, name: str, dtype: ir.DataType, shape: tuple[int, ...], make: object) -> ir.Value:
    """A pass-made weight `name` (computed when written), or the one an earlier graph of the folder made."""
    if name in graph.initializers:
        return graph.initializers[name]
    tensor = ir.LazyTensor(make, dtype, ir.Shape(shape), name=name)  # type: ignore[arg-type]
    return mark_weight(initializer(graph, name, tensor))


def folded_expert_weights(
    graph: ir.Graph,
    gate: ir.Value,
    up: ir.Value,
    down: ir.Value,
    compute: ir.DataType,
    shared: SharedExperts | None = None,
    factor: float = 1.0,
) -> tuple[ir.Value, ir.Value]:
    """fc1 [E, 2 ff, D] (rows g0, u0, g1, u1, ...) and fc2 [E, D, ff] as weights in `compute` precision;
    with `shared`, its n experts follow the E routed ones (E + n experts); fc2 times `factor` (the
    kernel's output scale, passes/moe_router_inputs.py), computed in float32 before the cast."""
    experts, ff, hidden = expert_shape(gate)
    assert gate.name is not None and down.name is not None
    to = FLOAT_NUMPY[compute]
    g, u, d = gate.const_value, up.const_value, down.const_value
    assert g is not None and u is not None and d is not None
    extra = shared.count if shared is not None else 0

    def parts() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if shared is None:
            return g.numpy(), u.numpy(), d.numpy()
        sg, su, sd = shared.stacked(ff)
        return tuple(np.concatenate([a.numpy(), b]) for a, b in ((g, sg), (u, su), (d, sd)))  # type: ignore[return-value]

    def fc1() -> ir.TensorProtocol:
        g_all, u_all, _ = parts()
        pairs = np.stack([g_all, u_all], axis=2)  # [E, ff, 2, D]
        return ir.tensor(pairs.reshape(experts + extra, 2 * ff, hidden).astype(to))

    with_shared = "_with_shared" if extra else ""
    suffix = "" if compute == gate.dtype else f"_{compute.name.lower()}"
    fc1_value = folder_weight(
        graph,
        gate.name.removesuffix("gate_proj.weight") + "gate_up_proj.weight" + with_shared + suffix,
        compute,
        (experts + extra, 2 * ff, hidden),
        fc1,
    )
    if down.dtype == compute and not extra and factor == 1.0:
        return fc1_value, down
    times = "" if factor == 1.0 else f"_times{factor:g}"

    def fc2() -> ir.TensorProtocol:
        d_all = parts()[2]
        return ir.tensor((d_all if factor == 1.0 else d_all.astype(np.float32) * np.float32(factor)).astype(to))

    fc2_value = folder_weight(
        graph, f"{down.name}{with_shared}{times}_{compute.name.lower()}", compute, (experts + extra, hidden, ff), fc2
    )
    return fc1_value, fc2_value


def kernel_shared_experts(moe: ir.Node) -> SharedExperts | None:
    """The shared MLP added to `moe`'s output, as experts its kernel can run: where the kernel runs in 16 bits
    (on the GPU the float32 MoE kernel is a slow SIMT GEMM: the shared MLP stays on cuBLAS there) and the
    shared weights are float initializers; else None."""
    x, gate = moe.inputs[0], moe.inputs[MOE_EXPERT_INPUTS[0]]
    if x is None or gate is None or kernel_dtype(x.dtype) != ir.DataType.FLOAT16:
        return None
    shared = find_shared_experts(moe, expert_shape(gate)[1])
    if shared is None or not all(float_initializer(v) for v in (shared.gate, shared.up, shared.down)):
        return None
    return shared


def _drop_unused(graph: ir.Graph, values: list[ir.Value]) -> None:
    for value in values:
        name = value.name
        if name is not None and name in graph.initializers and not value.uses() and value not in graph.outputs:
            graph.initializers.pop(name)


class LowerMoEToOrtPass(DsPass):
    def __init__(self, shared_experts: bool = True) -> None:
        super().__init__()
        self.shared_experts = shared_experts  # fold the shared experts in where the kernel runs in 16 bits

    def requires(self, model: ir.Model) -> None:
        for node in self._moes(model):
            for index in MOE_EXPERT_INPUTS:
                expert_shape(node.inputs[index])  # type: ignore[arg-type]

    def _moes(self, model: ir.Model) -> list[ir.Node]:
        return [n for n in model.graph if n.domain == DOMAIN and n.op_type == MOE_OP]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, opset = model.graph, model.opset_imports[""]
        moes = self._moes(model)
        for moe in moes:
            self._lower(graph, moe, opset)
        if moes:
            model.opset_imports[MS_DOMAIN] = 1
        return StageResult(model, bool(moes), {"moe_to_com_microsoft": len(moes)})

    def _lower(self, graph: ir.Graph, moe: ir.Node, opset: int) -> None:
        x, gate, up, down = moe.inputs[0], *(moe.inputs[i] for i in MOE_EXPERT_INPUTS)
        assert x is not None and gate is not None and up is not None and down is not None
        experts, ff, hidden = expert_shape(gate)
        compute = kernel_dtype(x.dtype)
        folded = all(float_initializer(v) for v in (gate, up, down))
        shared = kernel_shared_experts(moe) if self.shared_experts and folded else None
        extra = shared.count if shared is not None else 0
        origin = [moe, *((*shared.nodes, shared.add) if shared is not None else ())]
        b = Builder(moe.name or "moe", rewrite=provenance.lowered(f"{MS_DOMAIN}.MoE"), origin=origin)
        route = router_inputs(graph, moe, b, opset, experts, extra, compute)
        factor = kernel_factor(moe, extra) or 1.0  # with the routing in the graph: route.weight_sum instead
        if folded:
            fc1, fc2 = folded_expert_weights(graph, gate, up, down, compute, shared, factor)
            factor = 1.0  # in fc2
        else:  # FP8 experts reach the MoE through their DequantizeLinear: interleave and cast in the graph
            axis = b.ints(2, name="axis")
            pairs = b.op("Concat", b.op("Unsqueeze", gate, axis), b.op("Unsqueeze", up, axis), axis=2, name="gate_up")
            shape = b.ints(experts, 2 * ff, hidden, name="fc1_shape")
            fc1 = cast(
                b, b.op("Reshape", pairs, shape, name="fc1"), gate.dtype or x.dtype, compute, "fc1"
            )  # [E, 2ff, D]
            fc2 = cast(b, down, down.dtype or x.dtype, compute, "down")
        y = b.op(
            "MoE",
            cast(b, x, x.dtype, compute, "x"),
            route.probs,
            fc1,
            None,
            fc2,
            domain=MS_DOMAIN,
            name="moe",
            k=moe.attributes["top_k"].as_int() + extra,
            activation_type="swiglu",
            swiglu_fusion=1,
            activation_alpha=1.0,
            activation_beta=0.0,
            normalize_routing_weights=int(route.normalize),
        )
        out = scaled_output(b, cast(b, y, compute, x.dtype, "y"), x, route, factor)
        b.insert_before(graph, moe)
        ir.convenience.replace_nodes_and_values(
            graph, insertion_point=moe, old_nodes=[moe], new_nodes=[], old_values=moe.outputs, new_values=[out]
        )
        if shared is not None:
            remove_shared(graph, shared)
        if folded:
            _drop_unused(graph, [gate, up, down])
