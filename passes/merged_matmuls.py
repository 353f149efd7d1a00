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
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir
from dsv3c.artifact import provenance
from dsv3c.artifact.names import MERGED_JOIN
from dsv3c.export.builder import Builder, static_dims
from dsv3c.passes.lower_ort import FLOAT_NUMPY, folder_weight
from dsv3c.passes.stages import DsPass, StageResult


def _stored_weight(node: ir.Node) -> ir.Value | None:
    """The float [in, out] weight `node` multiplies by, when it is a standard MatMul of that form."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    w = node.inputs[1]
    if w is None or not w.is_initializer() or w.const_value is None or w.dtype not in FLOAT_NUMPY:
        return None
    return w if w.shape is not None and len(w.shape) == 2 and all(isinstance(d, int) for d in w.shape) else None


def merged_name(weights: list[ir.Value]) -> str:
    """The merged weight's name: its parts' names joined by MERGED_JOIN (merged_parts splits it again)."""
    return MERGED_JOIN.join(w.name or "" for w in weights)


def merged_parts(name: str) -> list[str]:
    return name.split(MERGED_JOIN)


def _sizes(split: ir.Node) -> list[int] | None:
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
        groups: dict[ir.Value, list[ir.Node]] = defaultdict(list)
        for node in graph:
            x = node.inputs[0] if node.inputs else None
            w = _stored_weight(node)
            if x is not None and w is not None and node.outputs[0] not in graph.outputs:
                groups[x].append(node)
        merged = 0
        for matmuls in groups.values():
            by_dtype: dict[ir.DataType | None, list[ir.Node]] = defaultdict(list)
            for m in matmuls:
                by_dtype[m.inputs[1].dtype if m.inputs[1] is not None else None].append(m)
            for same in by_dtype.values():
                if len(same) > 1:
                    self._merge(graph, same)
                    merged += len(same)
        return StageResult(model, merged > 0, {"matmuls_merged": merged})

    def _merge(self, graph: ir.Graph, matmuls: list[ir.Node]) -> None:
        weights = [m.inputs[1] for m in matmuls]
        assert all(w is not None for w in weights)
        dims = [static_dims(w.shape) for w in weights]  # type: ignore[union-attr]
        tensors = [w.const_value for w in weights]  # type: ignore[union-attr]
        dtype = weights[0].dtype  # type: ignore[union-attr]
        assert dtype is not None
        width = [d[1] for d in dims]
        joined = folder_weight(
            graph,
            merged_name(weights),  # type: ignore[arg-type]
            dtype,
            (dims[0][0], sum(width)),
            lambda: ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=1)),  # type: ignore[union-attr]
        )
        # pieces: each MatMul's output, or the pieces of the one Split along the last axis that alone reads it
        pieces: list[tuple[int, ir.Value]] = []
        absorbed: list[ir.Node] = []
        for m, n in zip(matmuls, width, strict=True):
            out = m.outputs[0]
            uses = list(out.uses())
            split = uses[0].node if len(uses) == 1 else None
            rank = len(out.shape) if out.shape is not None else 0
            sizes = _sizes(split) if split is not None and split.op_type == "Split" and rank else None
            whole = split is not None and sizes is not None and sum(sizes) == n and _last_axis(split, rank)
            if whole and split is not None and sizes is not None and not any(o in graph.outputs for o in split.outputs):
                pieces += list(zip(sizes, split.outputs, strict=True))
                absorbed.append(split)
            else:
                pieces.append((n, out))
        first = min(matmuls, key=lambda m: list(graph).index(m))
        b = Builder(first.name or "matmul", rewrite=provenance.lowered("MatMul"), origin=[*matmuls, *absorbed])
        product = b.op("MatMul", first.inputs[0], joined, name="merged")
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
