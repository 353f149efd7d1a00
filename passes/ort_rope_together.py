"""The queries' and the key's RoPE of an MLA layer as one com.microsoft::RotaryEmbedding (`lower --target ort`).

In a model with a plain q_proj (V2-Lite; q_lora_rank null) the queries and the latent KV come out of one
merged projection (passes/merged_matmuls.py), and after the rotary fusion (ort_fusions_rotary.py) a layer
rotates its RoPE parts in two ops, each between Casts in a 16-bit graph (DeepSeek rotates in float32):

    q, ckv, kpe = Split(x @ W)                      q: [B, S, H * (n + r)], head by head: n nope, r rope
    q_nope, q_pe = Split(Reshape(q, [B, S, H, n + r]), [n, r])
    q_pe = Cast(Rotary(Cast(q_pe), heads=H))        kpe = Cast(Rotary(Cast(kpe), heads=1))

Both use the same positions and cos/sin, so they are one rotation over H + 1 heads when the projection
writes the query heads' RoPE columns and the key's side by side. This stage reorders W's columns once
(a weight of the folder named `<W>` + ROPE_LAST_SUFFIX; of an 8-bit MatMulNBits, its rows and their
scales) to [all heads' nope | the other parts | all heads' rope | the key's rope] and writes

    q_nope, ckv, pe = Split(x @ W')
    q_pe, kpe = Split(Cast(Rotary(Cast(pe), heads=H + 1)), [H * r, r])

Every output is the same dot product and the same float32 rotation as before, rounded once, so the numbers
do not change. Per layer at decode: the per-head Split, a rotary op and two Casts fewer, a Split more (three
launches fewer in a bf16 graph, one in a float32 one).

Measured with passes/ort_half_softmax.py (the two together; V2-Lite bf16, the H200, `bash
bench/decode_gpu.sh rope-softmax 371b5b7` against the lowering of 3ff7ad3 in one call,
bench/results/gpu_decode_v2-lite{,-before}_h200_2026-12-03.json): 4.55 -> 4.31 ms/token at batch 1
context 128 (1.06x), 5.03 -> 4.79 at 16384; 8.28 -> 8.08 and 11.04 -> 10.62 at batch 8; 12.14 -> 11.90 and
22.42 -> 21.40 at batch 32; 1,399 -> 1,264 kernels per batch-1 step, busy 3.86 -> 3.69 ms
(bench/results/gpu_step_kernels_v2-lite_b1_h200_2026-12-03.json). Models with q_lora (V3, the `tiny` and `small`
presets) compute their queries in a GEMM of their own, and are left as they are: joining their RoPE parts
would cost a Concat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from dsv3c.artifact import provenance
from dsv3c.artifact.names import Q8_SCALES_SUFFIX, Q8_SUFFIX
from dsv3c.export.builder import Builder, static_dims
from dsv3c.onnxkit.uses import only_use
from dsv3c.passes.lower_ort import MS_DOMAIN, folder_weight
from dsv3c.passes.merged_matmuls import nbits_weights, split_sizes, stored_weight
from dsv3c.passes.stages import DsPass, StageResult

ROPE_LAST_SUFFIX = "/rope_last"  # a merged projection's weight with its RoPE columns last (8-bit: then _q8...)
REWRITE = provenance.lowered(f"{MS_DOMAIN}.RotaryEmbedding")


def _cast(node: ir.Node | None, to: ir.DataType | None = None) -> bool:
    return (
        node is not None
        and node.op_type == "Cast"
        and node.domain == ""
        and (to is None or node.attributes["to"].as_int() == to)
    )


def _rotary(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "RotaryEmbedding" and node.domain == MS_DOMAIN


@dataclass
class _Side:
    """One rotary op of the layer and the chain around it: `start` (a piece of a Split) is rotated into `end`."""

    rotary: ir.Node
    start: ir.Value
    end: ir.Value
    widen: ir.DataType | None  # the Cast before the rotation: its type (None: no Casts)
    narrow: ir.DataType | None  # the Cast after it


def _side(rotary: ir.Node, flat: bool) -> _Side | None:
    """Walk from `rotary` up to its Split piece and down to what reads the result; `flat`: the query's
    Reshapes to [B, S, H * r] and back are part of it."""
    x = rotary.inputs[0]
    if x is None or only_use(x) is not rotary:
        return None
    if flat:
        reshape = x.producer()
        if reshape is None or reshape.op_type != "Reshape" or only_use(reshape.inputs[0]) is not reshape:
            return None
        x = reshape.inputs[0]
    cast = x.producer() if x is not None else None
    widen = None
    if _cast(cast, ir.DataType.FLOAT) and cast is not None and only_use(cast.inputs[0]) is cast:
        widen, x = ir.DataType.FLOAT, cast.inputs[0]
    end = rotary.outputs[0]
    if flat:
        back = only_use(end)
        if back is None or back.op_type != "Reshape":
            return None
        end = back.outputs[0]
    narrow = None
    after = only_use(end)
    if widen is not None and _cast(after) and after is not None:
        narrow, end = ir.DataType(after.attributes["to"].as_int()), after.outputs[0]
        if x is None or narrow != x.dtype:
            return None
    elif widen is not None:
        return None
    assert x is not None
    return _Side(rotary, x, end, widen, narrow)


def _same_rotation(a: ir.Node, b: ir.Node) -> bool:
    """Same positions, cos and sin, and the same attributes but the heads."""
    attrs = lambda n: {k: v.value for k, v in n.attributes.items() if k != "num_heads"}  # noqa: E731
    return list(a.inputs[1:]) == list(b.inputs[1:]) and attrs(a) == attrs(b)


@dataclass
class _Layer:
    matmul: ir.Node  # x @ W
    split: ir.Node  # its Split into the parts
    q: int  # the queries' piece of it
    k: int  # the key rope's piece
    heads_split: ir.Node  # q_nope, q_pe = Split(Reshape(q))
    heads: int
    nope: int
    rope: int
    query: _Side
    key: _Side


def _layer(key_rotary: ir.Node) -> _Layer | None:
    """The layer around a one-head rotary op, when it has the form of the module docstring."""
    key = _side(key_rotary, flat=False)
    split = key.start.producer() if key is not None else None
    if key is None or split is None or split.op_type != "Split" or len(split.outputs) < 3:
        return None
    matmul = split.inputs[0].producer() if split.inputs[0] is not None else None
    sizes = split_sizes(split)
    axis = split.attributes["axis"].as_int() if "axis" in split.attributes else 0
    projection = matmul is not None and (stored_weight(matmul) is not None or _rows_first(matmul))
    if matmul is None or not projection or sizes is None or axis not in (-1, 2) or not _dims(key.start, 3):
        return None
    if only_use(matmul.outputs[0]) is not split:
        return None
    for q, piece in enumerate(split.outputs):
        view = only_use(piece)
        heads_split = only_use(view.outputs[0]) if view is not None and view.op_type == "Reshape" else None
        if heads_split is None or heads_split.op_type != "Split" or len(heads_split.outputs) != 2:
            continue
        shape = view.outputs[0].shape if view is not None else None
        parts = split_sizes(heads_split)
        heads_axis = heads_split.attributes["axis"].as_int() if "axis" in heads_split.attributes else 0
        if (
            shape is None
            or len(shape) != 4
            or not isinstance(shape[2], int)
            or parts is None
            or heads_axis not in (-1, 3)
        ):
            continue
        if not _dims(view.outputs[0], 4, sum(parts)):  # type: ignore[union-attr]  # [B, S, H, n + r]
            continue
        query_rotary = only_use(heads_split.outputs[1])
        while query_rotary is not None and not _rotary(query_rotary):  # through the Cast and the Reshape
            query_rotary = only_use(query_rotary.outputs[0])
        query = _side(query_rotary, flat=True) if query_rotary is not None else None
        if query is None or query.start is not heads_split.outputs[1] or not _same_rotation(query.rotary, key.rotary):
            continue
        heads, (nope, rope) = shape[2], parts
        fits = sizes[q] == heads * (nope + rope) and sizes[split.outputs.index(key.start)] == rope
        # the query rotated as [B, S, H * r] and reshaped back to [B, S, H, r]
        fits = fits and _dims(query.rotary.inputs[0], 3, heads * rope) and _dims(query.end, 4, heads, rope)
        if fits and (query.widen, query.narrow) == (key.widen, key.narrow):
            k = list(split.outputs).index(key.start)
            return _Layer(matmul, split, q, k, heads_split, heads, nope, rope, query, key)
    return None


def _rows_first(matmul: ir.Node) -> bool:
    """A MatMulNBits whose rows [N, blocks, blob] and scales [N, blocks] are initializers (the 8-bit
    lowering's layout: its output channels along axis 0 of both)."""
    weights = nbits_weights(matmul)
    if weights is None:
        return False
    n = matmul.attributes["N"].as_int()
    return _dims(weights[0], 3) and _dims(weights[1], 2) and {w.shape[0] for w in weights} == {n}  # type: ignore[index]


def _dims(value: ir.Value | None, rank: int, *last: int) -> bool:
    """`value` has `rank` dims, the last ones `last` (static)."""
    shape = value.shape if value is not None else None
    if shape is None or len(shape) != rank:
        return False
    return not last or tuple(shape.dims[rank - len(last) :]) == last


def _columns(layer: _Layer, widths: list[int]) -> tuple[np.ndarray, list[int]]:
    """W's columns in the new order, and the new pieces' widths: nope, the other parts, the rope parts."""
    offsets = np.cumsum([0, *widths])
    per_head = np.arange(layer.heads)[:, None] * (layer.nope + layer.rope) + offsets[layer.q]
    nope = (per_head + np.arange(layer.nope)).reshape(-1)
    rope = (per_head + layer.nope + np.arange(layer.rope)).reshape(-1)
    others = [j for j in range(len(widths)) if j not in (layer.q, layer.k)]
    key = np.arange(offsets[layer.k], offsets[layer.k + 1])
    order = np.concatenate([nope, *(np.arange(offsets[j], offsets[j + 1]) for j in others), rope, key])
    return order, [nope.size, *(widths[j] for j in others), rope.size + key.size]


def _reordered(graph: ir.Graph, weight: ir.Value | None, order: np.ndarray, axis: int) -> ir.Value:
    """`weight` with its output channels (`axis`) in `order`, a weight of the folder."""
    assert weight is not None and weight.name is not None and weight.dtype is not None
    source = weight.const_value

    def make() -> ir.TensorProtocol:
        assert source is not None
        return ir.tensor(np.take(source.numpy(), order, axis=axis))

    # an 8-bit weight's name keeps ending in its suffix (runtime/random_weights.py draws scales by it)
    kind = next((k for k in (Q8_SCALES_SUFFIX, Q8_SUFFIX) if weight.name.endswith(k)), "")
    name = weight.name + ROPE_LAST_SUFFIX + kind
    return folder_weight(graph, name, weight.dtype, static_dims(weight.shape), make)


def _projection(b: Builder, graph: ir.Graph, matmul: ir.Node, order: np.ndarray) -> ir.Value:
    """`matmul` again with its output columns in `order`: a float [in, out] weight's columns, or a
    MatMulNBits' rows and their scales (each row is quantized on its own)."""
    if matmul.op_type == "MatMul":
        return b.op("MatMul", matmul.inputs[0], _reordered(graph, matmul.inputs[1], order, 1), name="rope_last")
    rows, scales = (_reordered(graph, v, order, 0) for v in matmul.inputs[1:3])
    attrs = {k: v.value for k, v in matmul.attributes.items()}
    return b.op("MatMulNBits", matmul.inputs[0], rows, scales, domain=MS_DOMAIN, name="rope_last", **attrs)


def _rewrite(graph: ir.Graph, layer: _Layer) -> None:
    widths = split_sizes(layer.split)
    assert widths is not None
    order, new_widths = _columns(layer, widths)
    query, key = layer.query, layer.key
    origin = [layer.matmul, layer.split, layer.heads_split, query.rotary, key.rotary]
    b = Builder(layer.split.name or "rope_together", rewrite=REWRITE, origin=origin)
    product = _projection(b, graph, layer.matmul, order)
    widths_value = b.const(np.array(new_widths, np.int64), name="widths")
    pieces = b.op("Split", product, widths_value, axis=-1, num_outputs=len(new_widths), name="split")
    q_nope = b.op("Reshape", pieces[0], b.ints(0, 0, layer.heads, layer.nope, name="nope_shape"), name="q_nope")
    pe = pieces[-1]
    if query.widen is not None:
        pe = b.op("Cast", pe, to=query.widen, name="widen")
    attrs = {k: v.value for k, v in query.rotary.attributes.items() if k != "num_heads"}
    rotated = b.op(
        "RotaryEmbedding", pe, *query.rotary.inputs[1:], domain=MS_DOMAIN, num_heads=layer.heads + 1, **attrs
    )
    if query.narrow is not None:
        rotated = b.op("Cast", rotated, to=query.narrow, name="narrow")
    q_flat, k_pe = b.op(
        "Split",
        rotated,
        b.const(np.array([layer.heads * layer.rope, layer.rope], np.int64), name="rope_widths"),
        axis=-1,
        num_outputs=2,
        name="rope_split",
    )
    q_pe = b.op("Reshape", q_flat, b.ints(0, 0, layer.heads, layer.rope, name="rope_shape"), name="q_pe")
    others = [v for j, v in enumerate(layer.split.outputs) if j not in (layer.q, layer.k)]
    _types(layer, new_widths, pieces, q_nope, pe, rotated, q_flat, k_pe, q_pe)
    b.insert_before(graph, layer.matmul)
    old = [layer.heads_split.outputs[0], *others, query.end, key.end]
    new = [q_nope, *pieces[1:-1], q_pe, k_pe]
    ir.convenience.replace_nodes_and_values(
        graph, insertion_point=layer.matmul, old_nodes=[], new_nodes=[], old_values=old, new_values=new
    )


def _types(layer: _Layer, widths: list[int], pieces: tuple[ir.Value, ...], *values: ir.Value) -> None:
    """The new values' types and shapes (no shape inference knows the com.microsoft op)."""
    half = layer.split.outputs[0].type
    rows = layer.split.outputs[0].shape
    assert rows is not None
    q_nope, pe, rotated, q_flat, k_pe, q_pe = values
    width = (layer.heads + 1) * layer.rope
    for value, w in zip(pieces, widths, strict=True):
        value.type, value.shape = half, ir.Shape([*rows.dims[:2], w])
    rotate_type = ir.TensorType(layer.query.widen) if layer.query.widen is not None else half
    for value, w, t in (
        (pe, width, rotate_type),
        (rotated, width, half),
        (q_flat, layer.heads * layer.rope, half),
        (k_pe, layer.rope, half),
    ):
        value.type, value.shape = t, ir.Shape([*rows.dims[:2], w])
    q_nope.type, q_nope.shape = half, ir.Shape([*rows.dims[:2], layer.heads, layer.nope])
    q_pe.type, q_pe.shape = half, ir.Shape([*rows.dims[:2], layer.heads, layer.rope])


class RopeTogetherPass(DsPass):
    """Each MLA layer's query and key RoPE (the form of the module docstring) -> one RotaryEmbedding."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers = [
            layer
            for node in list(graph)
            if _rotary(node) and node.attributes.get_int("num_heads", 0) == 1 and (layer := _layer(node))
        ]
        weights = {v for layer in layers for v in layer.matmul.inputs[1:]}
        for layer in layers:
            _rewrite(graph, layer)
        if layers:
            common.RemoveUnusedNodesPass()(model)  # the old projections, Splits, Casts and rotary ops
            graph.sort()  # layer 0's new rotary op reads the cos/sin cache made after its projection
            for weight in weights:  # stored once, reordered
                if weight is not None and weight.name is not None and not weight.uses():
                    graph.initializers.pop(weight.name, None)
        return StageResult(model, bool(layers), {"rope_together": len(layers)} if layers else {})
