"""MatMuls of one activation by stored weights, merged into one: `x @ [W1 | W2 | ...]`, then a Split.

MLA projects the same normed hidden state twice, to the queries (q_proj, or V3's q_a_proj) and to the
latent KV and the RoPE key (kv_a_proj_with_mqa); a dense MLP projects it to its gate and its up rows. At
decode these are GEMVs of a few megabytes each, short enough that a launch and a wave's tail cost as much
as their bytes: one GEMV over the concatenated weights reads the same bytes in one launch. The weights
(stored [in, out], passes/transposed_weights.py) are concatenated once, into a weight of the folder named
after its parts
(joined by `+`). A Split that read one of the parts alone, along the same axis, joins the merged Split
(kv_a_proj's latent/RoPE split): one launch fewer again.

The numbers do not change: every output column is the same dot product of x and one weight column.
The 8-bit lowering's MatMulNBits (passes/lower_ort_8bit.py) merge the same way: their rows are quantized
one by one, so the merged weight is the parts' uint8 rows and scales stacked (same K, bits and block).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.artifact.names import MERGED_JOIN
from dsv3c.export.builder import Builder, static_dims
from dsv3c.passes.lower_ort import FLOAT_NUMPY, MS_DOMAIN, folder_weight
from dsv3c.passes.stages import DsPass, StageResult


def stored_weight(node: ir.Node) -> ir.Value | None:
    """The float [in, out] weight `node` multiplies by, when it is a standard MatMul of that form."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    w = node.inputs[1]
    if w is None or not w.is_initializer() or w.const_value is None or w.dtype not in FLOAT_NUMPY:
        return None
    return w if w.shape is not None and len(w.shape) == 2 and all(isinstance(d, int) for d in w.shape) else None


NBITS_ATTRS = ("K", "bits", "block_size", "accuracy_level")


def nbits_weights(node: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """(B, scales) of a MatMulNBits without zero points or bias, when both are initializers."""
    if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN or len(node.inputs) != 3:
        return None
    b, scales = node.inputs[1], node.inputs[2]
    known = all(v is not None and v.is_initializer() and v.const_value is not None for v in (b, scales))
    if not known or any(a not in node.attributes for a in (*NBITS_ATTRS, "N")):
        return None
    return b, scales  # type: ignore[return-value]


def _group_key(node: ir.Node) -> tuple[object, ...] | None:
    """What MatMuls of one activation must share to merge: the weight's dtype (MatMul) or the 8-bit
    layout (MatMulNBits)."""
    w = stored_weight(node)
    if w is not None:
        return ("MatMul", w.dtype)
    nbits = nbits_weights(node)
    if nbits is not None:
        return ("MatMulNBits", nbits[1].dtype, *(node.attributes[a].as_int() for a in NBITS_ATTRS))
    return None


def merged_name(weights: list[ir.Value]) -> str:
    """The merged weight's name: its parts' names joined by MERGED_JOIN (merged_parts splits it again)."""
    return MERGED_JOIN.join(w.name or "" for w in weights)


def merged_parts(name: str) -> list[str]:
    return name.split(MERGED_JOIN)


def split_sizes(split: ir.Node) -> list[int] | None:
    """A Split's piece sizes when they are a constant input."""
    sizes = split.inputs[1] if len(split.inputs) > 1 else None
    tensor = sizes.const_value if sizes is not None else None
    if tensor is None and sizes is not None and (p := sizes.producer()) is not None and p.op_type == "Constant":
        tensor = p.attributes["value"].as_tensor() if "value" in p.attributes else None
    return [int(v) for v in tensor.numpy().reshape(-1)] if tensor is not None else None


def _last_axis(node: ir.Node, rank: int) -> bool:
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
    return axis in (-1, rank - 1)


class MergedMatMulsPass(DsPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        groups: dict[tuple[object, ...], list[ir.Node]] = defaultdict(list)
        for node in graph:
            x = node.inputs[0] if node.inputs else None
            key = _group_key(node)
            if x is not None and key is not None and node.outputs[0] not in graph.outputs:
                groups[(x, *key)].append(node)
        merged = 0
        for same in groups.values():
            if len(same) > 1:
                self._merge(graph, same)
                merged += len(same)
        return StageResult(model, merged > 0, {"matmuls_merged": merged})

    def _merge(self, graph: ir.Graph, matmuls: list[ir.Node]) -> None:
        first = min(matmuls, key=lambda m: list(graph).index(m))
        nbits = first.op_type == "MatMulNBits"
        weights = [m.inputs[1] for m in matmuls] + ([m.inputs[2] for m in matmuls] if nbits else [])
        if nbits:  # rows [N, K / block, block] and scales [N, K / block], stacked along N
            width = [m.attributes["N"].as_int() for m in matmuls]
        else:  # [K, N], side by side
            width = [static_dims(m.inputs[1].shape)[1] for m in matmuls]  # type: ignore[union-attr]
        pieces, absorbed = self._pieces(graph, matmuls, width)
        op = f"{MS_DOMAIN}.{first.op_type}" if nbits else first.op_type
        b = Builder(first.name or "matmul", rewrite=provenance.lowered(op), origin=[*matmuls, *absorbed])
        if nbits:
            count = len(matmuls)
            joined, scales = _stacked(graph, weights[:count], 0), _stacked(graph, weights[count:], 0)
            attrs = {a: first.attributes[a].as_int() for a in NBITS_ATTRS}
            product = b.op(
                "MatMulNBits", first.inputs[0], joined, scales, domain=MS_DOMAIN, name="merged", N=sum(width), **attrs
            )
        else:
            product = b.op("MatMul", first.inputs[0], _stacked(graph, weights, 1), name="merged")
        outs = b.op(
            "Split",
            product,
            b.const(np.array([s for s, _ in pieces], np.int64), name="widths"),
            axis=-1,
            num_outputs=len(pieces),
            name="merged_split",
        )
        b.insert_before(graph, first)
        for new, (_, old) in zip(outs, pieces, strict=True):
            new.shape, new.type = old.shape, old.type
            old.replace_all_uses_with(new)
        for node in [*absorbed, *matmuls]:
            graph.remove(node, safe=True)
        for w in weights:
            assert w is not None and w.name is not None
            if not w.uses() and w not in graph.outputs and w.name in graph.initializers:
                graph.initializers.pop(w.name)

    def _pieces(
        self, graph: ir.Graph, matmuls: list[ir.Node], width: list[int]
    ) -> tuple[list[tuple[int, ir.Value]], list[ir.Node]]:
        """Each MatMul's output, or the pieces of the one Split along the last axis that alone reads it
        (with its width); and those Splits."""
        pieces: list[tuple[int, ir.Value]] = []
        absorbed: list[ir.Node] = []
        for m, n in zip(matmuls, width, strict=True):
            out = m.outputs[0]
            uses = list(out.uses())
            split = uses[0].node if len(uses) == 1 else None
            rank = len(out.shape) if out.shape is not None else 0
            sizes = split_sizes(split) if split is not None and split.op_type == "Split" and rank else None
            whole = split is not None and sizes is not None and sum(sizes) == n and _last_axis(split, rank)
            if whole and split is not None and sizes is not None and not any(o in graph.outputs for o in split.outputs):
                pieces += list(zip(sizes, split.outputs, strict=True))
                absorbed.append(split)
            else:
                pieces.append((n, out))
        return pieces, absorbed


def _stacked(graph: ir.Graph, values: list[ir.Value | None], axis: int) -> ir.Value:
    """The initializers `values` concatenated along `axis`, as a weight of the folder named after its parts."""
    tensors = [v.const_value for v in values if v is not None]
    dims = [static_dims(v.shape) for v in values if v is not None]
    shape = list(dims[0])
    shape[axis] = sum(d[axis] for d in dims)
    dtype = values[0].dtype if values[0] is not None else None
    assert dtype is not None and len(tensors) == len(values)
    return folder_weight(
        graph,
        merged_name(values),  # type: ignore[arg-type]
        dtype,
        tuple(shape),
        lambda: ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=axis)),  # type: ignore[union-attr]
    )
