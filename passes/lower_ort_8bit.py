"""8-bit weights onnxruntime's CPU kernels read directly: MatMulNBits (bits=8) and QMoE (8-bit experts).

    MatMul(x, Transpose([DQ(] W [)]))       ->  com.microsoft::MatMulNBits(x, W_q8, W_q8_scales, bits=8)
    dsv3c::MoE(x, router, bias, gate, up, down) -> com.microsoft::QMoE(x, router_probs, fc1_q8, fc1_q8_scales,
                                                  -, down_q8, down_q8_scales)  (moe_router_inputs.py)

Each weight is first made float32 exactly: an FP8 weight (fp8_weights.py: FLOAT8E4M3FN [(E,) out, in] and
`<name>_scale_inv` [(E,) R, C], one float32 per source block, or `<name>_scale` per tensor / expert) is
dequantized as its DequantizeLinear does; a float weight is taken as it is. Then every row is quantized
symmetrically per block of `block` values along K (the input dimension): scale = amax / 127,
q = round(w / scale) + 128 as uint8 (no zero-point input: both kernels default to 128 at 8 bits), the
last block of a row zero-padded. That is finer than DeepSeek's 128x128 FP8 blocks (one scale per row
per block), so the int8 grid adds at most scale / 2 per weight on top of the FP8 error.

Layouts (onnxruntime 1.32, contrib op schemas): MatMulNBits B [N, ceil(K / block), block] uint8 with
scales [N, ceil(K / block)]; QMoE fc1 [E, 2 ff, D] with gate/up rows interleaved (swiglu_fusion=1, as the
float MoE lowering) and fc2 [E, D, ff], uint8, scales [E, rows, K / block]. QMoE's block must divide both
D and ff, so it is the largest power of two <= `block` (and >= 16) that does, and a MoE with none keeps
float experts (lower_ort.py). Measured on this CPU (onnxruntime 1.32): the fast 8-bit kernels quantize the
activations to int8 per block too (MatMulNBits accuracy_level=4; QMoE's block-wise 8-bit path always
does); MatMulNBits at accuracy_level 0 dequantizes the whole matrix every call (30x slower at M=1), so
the pass sets 4 (0 stays available for exactness checks).

Precision: the kernels read their scales in the activations' dtype, so the scales are stored in it.
MatMulNBits runs in the graph's dtype (onnxruntime's CUDA kernel takes float32, float16 and bfloat16).
QMoE runs where the float MoE lowering runs its MoE (lower_ort.kernel_dtype: float32 and float16 as they are,
bfloat16 in float16, with Casts around it). onnxruntime registers QMoE on CUDA for float16 and bfloat16 only:
a float32 graph's QMoE runs on the CPU (the CPU kernel's fast path), so export bf16 or fp16 for the GPU.

Converted: every linear MatMul (attention q/kv_a/o, dense and shared-expert MLPs, the output heads, MTP's
eh_proj: those of a quantized export that DeepSeek's recipe keeps high precision too) and the routed
experts. In 16-bit graphs with float weights the shared experts join QMoE instead (`foldable_shared`;
`lower --shared-experts-apart` keeps them as MatMulNBits). Left as they were: the MoE router
(precision-critical, tiny), MLA's kv_b_proj (the attention core splits it per head; not a 2-D MatMul),
the embedding (a Gather). The activations' FP8 fake-quantization
of a quantized export stays in front of the converted linears.

Error (`dsv3c lower` records it per output in the manifest, on seeded random inputs): one linear adds
0.6-0.9 % at block 128 (0.76 % at 32; the cache written by the first layer of the `small` preset), about
half from the weights and half from the kernels' int8 activations. Whole-model logits of these random
models move much more (small preset, block 128: 0.22-0.30 relative) because a perturbation flips some
tokens' expert routing, and the flip compounds over layers: a 1e-3 random relative perturbation of the
float weights already moves the small preset's prefill logits by 0.08, and DeepSeek's FP8 recipe itself
(`dsv3c quantize`) moves them by 0.48 with top-1 agreement 6 %.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.artifact.export_folder import mark_weight
from dsv3c.artifact.names import Q8_SCALES_SUFFIX, Q8_SUFFIX
from dsv3c.export.builder import Builder, initializer, static_dims
from dsv3c.export.onnx_ops import DOMAIN, MOE_OP
from dsv3c.models.fp8 import DEFAULT_BLOCK, Block
from dsv3c.onnxkit.linears import MOE_EXPERT_INPUTS, LinearKind, rewritable_linears, weight_source
from dsv3c.passes.lower_ort import FLOAT_NUMPY, expert_shape, kernel_dtype, kernel_shared_experts
from dsv3c.passes.moe_router_inputs import MS_DOMAIN, cast, kernel_factor, router_inputs, scaled_output
from dsv3c.passes.shared_experts import SharedExperts, remove_shared
from dsv3c.passes.stages import DsPass, StageResult

BITS = 8
ZERO_POINT = 128  # the kernels' default zero point at 8 bits
QMAX = 127  # symmetric: q in [-127, 127]
FAST = 4  # accuracy_level: int8 activations, the fast path (see the module docstring)
MIN_BLOCK = 16
SUFFIX, SCALES = Q8_SUFFIX, Q8_SCALES_SUFFIX


@dataclass(frozen=True)
class Int8Options:
    block: int = 128  # values per scale along K; a power of two >= 16
    source_block: Block = DEFAULT_BLOCK  # the FP8 blocks of a quantized export (its quantize stage's options)
    accuracy_level: int = FAST  # MatMulNBits: 0 keeps fp32 activations (exact, but dequantizes every call)
    linears: bool = True  # MatMulNBits for the linears too; False: the experts only (QMoE)

    def __post_init__(self) -> None:
        if self.block < MIN_BLOCK or self.block & (self.block - 1):
            raise ValueError(f"bug: 8-bit block {self.block} is not a power of two >= {MIN_BLOCK}")

    def to_dict(self) -> dict[str, object]:
        return {
            "bits": BITS,
            "block": self.block,
            "accuracy_level": self.accuracy_level,
            "symmetric": True,
            "linears": self.linears,
        }


def quantize_rows(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """float [..., N, K] -> (uint8 [..., N, ceil(K / block), block], float32 scales [..., N, ceil(K / block)])."""
    *lead, k = w.shape
    blocks = -(-k // block)
    padded = np.zeros((*lead, blocks * block), np.float32)
    padded[..., :k] = w
    tiles = padded.reshape(*lead, blocks, block)
    amax = np.abs(tiles).max(axis=-1)
    scales = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(tiles / scales[..., None]), -QMAX, QMAX) + ZERO_POINT
    return q.astype(np.uint8), scales


def dequantize_rows(q: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The kernels' view of `quantize_rows`' output: float32 [..., N, K]."""
    w = (q.astype(np.float32) - ZERO_POINT) * scales[..., None]
    return w.reshape(*w.shape[:-2], -1)[..., :k]


def _dequantize_fp8(fp8: np.ndarray, scale: np.ndarray, block: Block) -> np.ndarray:
    """fp8 [(E,) N, K] with block scales [(E,) R, C], or per tensor / expert scales ([] / [E]) -> float32."""
    w = np.asarray(fp8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    n, k = w.shape[-2:]
    s = np.asarray(scale, np.float32)
    if s.ndim == w.ndim:  # block scales
        s = np.repeat(np.repeat(s, block[0], axis=-2)[..., :n, :], block[1], axis=-1)[..., :k]
    elif s.ndim == 1:  # one scale per expert
        s = s[:, None, None]
    return w * s


Source = Callable[[], np.ndarray]


def float_source(graph: ir.Graph, weight: ir.Value, source_block: Block) -> Source:
    """A function giving `weight` (an initializer, float or FP8 with its scale) as float32 [(E,) N, K]."""
    name, tensor = weight.name, weight.const_value
    assert name is not None and tensor is not None
    if weight.dtype != ir.DataType.FLOAT8E4M3FN:
        return lambda: np.asarray(tensor.numpy(), dtype=np.float32)
    scale = graph.initializers.get(name + "_scale_inv") or graph.initializers.get(name + "_scale")
    if scale is None or scale.const_value is None:
        raise ir.passes.PreconditionError(f"fp8 weight {name} has no {name}_scale_inv (or _scale) initializer")
    scale_tensor = scale.const_value
    return lambda: _dequantize_fp8(tensor.numpy(), scale_tensor.numpy(), source_block)


class _Quantized:
    """(uint8, scales) pairs computed on first use, shared by the two lazy tensors of one weight (and by
    every graph of the folder: the writer computes a name once)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, name: str, make: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._cache:
            self._cache[name] = make()
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(name)
        return self._cache[name]

    def register(
        self,
        graph: ir.Graph,
        name: str,
        q_shape: tuple[int, ...],
        s_shape: tuple[int, ...],
        make: Callable[[], tuple[np.ndarray, np.ndarray]],
        scale_dtype: ir.DataType = ir.DataType.FLOAT,
    ) -> tuple[ir.Value, ir.Value]:
        """Initializers `name` (uint8 `q_shape`) and `name`_scales-like (`scale_dtype` `s_shape`: the kernels
        read their scales in the activations' dtype), or the existing."""
        names = (name + SUFFIX, name + SCALES)
        if names[0] in graph.initializers:
            return graph.initializers[names[0]], graph.initializers[names[1]]
        as_scale = FLOAT_NUMPY[scale_dtype]

        def part(i: int, shape: tuple[int, ...]) -> Callable[[], ir.TensorProtocol]:
            if i == 1:
                return lambda: ir.tensor(self.get(name, make)[1].reshape(shape).astype(as_scale))
            return lambda: ir.tensor(self.get(name, make)[0].reshape(shape))

        q = ir.LazyTensor(part(0, q_shape), ir.DataType.UINT8, ir.Shape(q_shape), name=names[0])
        s = ir.LazyTensor(part(1, s_shape), scale_dtype, ir.Shape(s_shape), name=names[1])
        return mark_weight(initializer(graph, names[0], q)), mark_weight(initializer(graph, names[1], s))


def _rows(source: Source, block: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    return lambda: quantize_rows(source(), block)


def _require_float(value: ir.Value | None, what: str) -> None:
    if value is not None and value.dtype not in (None, *FLOAT_NUMPY):
        raise ir.passes.PreconditionError(
            f"{what} is {value.dtype}; 8-bit weights are lowered for float32, float16 and bfloat16 graphs"
        )


class MatMulNBitsPass(DsPass):
    """Every linear `MatMul(x, Transpose(W))` -> MatMulNBits(bits=8) over W quantized per row per block."""

    def __init__(self, options: Int8Options, cache: _Quantized | None = None, shared_experts: bool = True) -> None:
        super().__init__()
        self.options = options
        self.cache = cache or _Quantized()
        self.shared_experts = shared_experts  # leave the shared MLPs MoEToQMoEPass folds into QMoE

    def requires(self, model: ir.Model) -> None:
        for linear in rewritable_linears(model.graph):
            if linear.kind == LinearKind.MATMUL:
                _require_float(linear.activation, f"the input of linear {linear.name}")
                if linear.weight.const_value is None:
                    raise ir.passes.PreconditionError(f"linear {linear.name} has no weight tensor")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, block = model.graph, self.options.block
        linears = rewritable_linears(graph)
        folded = set()
        for moe in _moes(graph) if self.shared_experts else []:
            shared = foldable_shared(moe, self.options)
            folded |= set(shared.nodes) if shared is not None else set()
        converted: dict[str, None] = {}
        for linear in linears:
            if linear.kind != LinearKind.MATMUL or linear.user in folded:
                continue
            n, k = static_dims(linear.weight.shape)
            blocks = -(-k // block)
            source = float_source(graph, linear.weight, self.options.source_block)
            dtype = linear.activation.dtype if linear.activation is not None else None
            q, s = self.cache.register(
                graph, linear.name, (n, blocks, block), (n, blocks), _rows(source, block), dtype or ir.DataType.FLOAT
            )
            self._replace(graph, linear.user, q, s, n, k)
            converted[linear.name] = None
        if converted:
            model.opset_imports[MS_DOMAIN] = 1
        kept = sorted({lin.name for lin in linears if lin.kind != LinearKind.MATMUL})
        return StageResult(
            model, bool(converted), {"matmul_nbits": len(converted), "converted": list(converted), "kept_float": kept}
        )

    def _replace(self, graph: ir.Graph, matmul: ir.Node, q: ir.Value, s: ir.Value, n: int, k: int) -> None:
        b = Builder(matmul.name or "matmul", rewrite=provenance.lowered(f"{MS_DOMAIN}.MatMulNBits"), origin=matmul)
        out = b.op(
            "MatMulNBits",
            matmul.inputs[0],
            q,
            s,
            domain=MS_DOMAIN,
            name="nbits",
            K=k,
            N=n,
            bits=BITS,
            block_size=self.options.block,
            accuracy_level=self.options.accuracy_level,
        )
        b.replace(graph, matmul, out)


def qmoe_block(block: int, hidden: int, ff: int) -> int | None:
    """The largest power of two in [16, block] dividing both hidden and ff (QMoE needs both), or None."""
    while block >= MIN_BLOCK:
        if hidden % block == 0 and ff % block == 0:
            return block
        block //= 2
    return None


def _moes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.domain == DOMAIN and n.op_type == MOE_OP]


def foldable_shared(moe: ir.Node, options: Int8Options) -> SharedExperts | None:
    """The shared experts QMoE runs as always-chosen experts of `moe` (as lower_ort.py does in 16-bit
    graphs), or None. Where the kernel runs in float16 (bf16 and float16 graphs) and the shared MLP's
    weights are float: its three MatMulNBits per layer (on the H200 at one token a row, 0.9 TB/s each,
    bench/results/gpu_step_kernels_v2-lite_b1_h200_2026-12-02.json) become rows of the grouped GEMV the
    routed experts already run. Each shared row is quantized per block along K as MatMulNBits would have
    quantized it (the expert width is a multiple of the block), so the 8-bit weights are the same numbers."""
    gate = moe.inputs[MOE_EXPERT_INPUTS[0]]
    if gate is None:
        return None
    _, ff, hidden = expert_shape(gate)
    return kernel_shared_experts(moe) if qmoe_block(options.block, hidden, ff) is not None else None


class MoEToQMoEPass(DsPass):
    """dsv3c::MoE -> com.microsoft::QMoE with 8-bit experts, routed in the kernel or in the graph as the float
    MoE is (passes/moe_router_inputs.py; the output factor in the down weights' block scales); in float16
    kernels with the shared experts as always-chosen experts (`foldable_shared`)."""

    def __init__(self, options: Int8Options, cache: _Quantized | None = None, shared_experts: bool = True) -> None:
        super().__init__()
        self.options = options
        self.cache = cache or _Quantized()
        self.shared_experts = shared_experts

    def requires(self, model: ir.Model) -> None:
        for node in _moes(model.graph):
            _require_float(node.inputs[0], f"the input of {node.name}")
            for index in MOE_EXPERT_INPUTS:
                expert_shape(node.inputs[index])  # type: ignore[arg-type]
                if weight_source(node.inputs[index]) is None:
                    raise ir.passes.PreconditionError(f"{node.name}: expert input {index} is not an initializer")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, opset = model.graph, model.opset_imports[""]
        done: list[str | None] = []
        kept: list[str | None] = []
        blocks: set[int] = set()
        for moe in _moes(graph):
            block = self._lower(graph, moe, opset)
            (done if block else kept).append(moe.name)
            if block:
                blocks.add(block)
        if done:
            model.opset_imports[MS_DOMAIN] = 1
        return StageResult(
            model, bool(done), {"moe_to_qmoe": len(done), "block_size": sorted(blocks), "kept_float": kept}
        )

    def _lower(self, graph: ir.Graph, moe: ir.Node, opset: int) -> int | None:
        """Replace `moe`; returns the block size, or None (left for the float lowering)."""
        x = moe.inputs[0]
        weights = [weight_source(moe.inputs[i]) for i in MOE_EXPERT_INPUTS]
        gate, up, down = weights
        assert x is not None and gate is not None and up is not None and down is not None
        experts, ff, hidden = expert_shape(gate)
        block = qmoe_block(self.options.block, hidden, ff)
        if block is None:
            return None
        g, u, d = (float_source(graph, w, self.options.source_block) for w in (gate, up, down))
        shared = foldable_shared(moe, self.options) if self.shared_experts else None
        extra = shared.count if shared is not None else 0

        def part(i: int) -> np.ndarray:  # gate, up or down (0, 1, 2): the routed experts, then the shared ones
            routed = (g, u, d)[i]()
            return routed if shared is None else np.concatenate([routed, shared.stacked(ff)[i].astype(np.float32)])

        def fc1() -> tuple[np.ndarray, np.ndarray]:  # [E, 2 ff, D], rows g0, u0, g1, u1, ...
            g_all, u_all = part(0), part(1)
            return quantize_rows(np.stack([g_all, u_all], axis=2).reshape(experts + extra, 2 * ff, hidden), block)

        assert gate.name is not None and down.name is not None
        prefix = gate.name.removesuffix("gate_proj.weight")
        with_shared = "_with_shared" if extra else ""
        factor = kernel_factor(moe, extra, "QMoE") or 1.0  # the kernel's output scale, in fc2's block scales
        times = "" if factor == 1.0 else f"_times{factor:g}"

        def fc2() -> tuple[np.ndarray, np.ndarray]:
            q, scales = quantize_rows(part(2), block)
            return q, scales * np.float32(factor)

        compute = kernel_dtype(x.dtype)
        q1, s1 = self.cache.register(
            graph,
            prefix + "gate_up_proj.weight" + with_shared,
            (experts + extra, 2 * ff, hidden),
            (experts + extra, 2 * ff, hidden // block),
            fc1,
            compute,
        )
        q2, s2 = self.cache.register(
            graph,
            down.name + with_shared + times,
            (experts + extra, hidden, ff),
            (experts + extra, hidden, ff // block),
            fc2,
            compute,
        )
        rewrite = provenance.lowered(f"{MS_DOMAIN}.QMoE")
        origin = [moe, *((*shared.nodes, shared.add) if shared is not None else ())]
        b = Builder(moe.name or "moe", rewrite=rewrite, origin=origin)
        route = router_inputs(graph, moe, b, opset, experts, extra, compute, "QMoE")
        y = b.op(
            "QMoE",
            cast(b, x, x.dtype, compute, "x"),
            route.probs,
            q1,
            s1,
            None,
            q2,
            s2,
            domain=MS_DOMAIN,
            name="qmoe",
            k=moe.attributes["top_k"].as_int() + extra,
            activation_type="swiglu",
            swiglu_fusion=1,
            activation_alpha=1.0,
            activation_beta=0.0,
            normalize_routing_weights=int(route.normalize),
            expert_weight_bits=BITS,
            block_size=block,
            quant_type="int",
        )
        out = scaled_output(b, cast(b, y, compute, x.dtype, "y"), x, route, 1.0)
        b.insert_before(graph, moe)
        ir.convenience.replace_nodes_and_values(
            graph, insertion_point=moe, old_nodes=[moe], new_nodes=[], old_values=moe.outputs, new_values=[out]
        )
        if shared is not None:
            remove_shared(graph, shared)
        return block
