"""DeepSeek-V2's routing of a QMoE layer moved from the graph into onnxruntime's CUDA kernel, at session load.

`lower --target ort` gives com.microsoft::MoE the router's log-probabilities and lets the kernel route
(passes/moe_router_inputs.py), but keeps QMoE's routing in the graph: onnxruntime's CPU QMoE renormalizes
over the top k whatever normalize_routing_weights says, and the folder must compute the same on every
provider. So an 8-bit graph computes R (the chosen experts' softmax probabilities scattered into a row of
zeros, ones for the shared experts), feeds the kernel Log(R) with normalize_routing_weights=1, and
multiplies its output by sum(R). The CUDA kernel honors normalize_routing_weights=0 (measured:
bench/gpu_moe_routing.py), so a CUDA session can take the in-kernel form the float graphs have:

    router_probs = Cast(Pad(LogSoftmax(logits), 0 per shared expert)), normalize 0, output times (1 + n)

(n shared experts folded into the kernel, passes/shared_experts.py; with none, no Pad and no factor).

The kernel's softmax over [log p, 0 .. 0] is [p, 1 .. 1] / (1 + n): the same mix. As in the float graphs,
the kernel ranks the float16 log-probabilities, where the graph ranked float32 probabilities: the chosen
set can differ only where two experts' scores fall within one float16 step at the k-th place. Per layer
the step loses Softmax, TopK, the scatter (a copy and a scatter), Log, ReduceSum and a Cast, and gains
LogSoftmax and Pad.

Only the exact pattern that passes/moe_router_inputs.py writes for a softmax, greedy, unscaled (factor 1)
routing is rewritten; anything else (a selection bias, groups, a scaling factor, renormalizing models) is
left in the graph.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
SCALAR_TYPES: dict[int, type] = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.BFLOAT16: ml_dtypes.bfloat16,
}


class _Graph:
    """Producers, consumers and constant values of a ModelProto's main graph."""

    def __init__(self, model: ModelProto):
        graph = model.graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        for n in graph.node:
            for name in n.input:
                self.consumers[name].append(n)
        self.outputs = {o.name for o in graph.output}
        self.initializers = {t.name: t for t in graph.initializer}

    def producer_op(self, name: str, op: str) -> NodeProto | None:
        """The node that computes `name`, if it is a standard `op`."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None

    def only_user(self, name: str) -> NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer_op(name, "Constant")
        attr = next((a for a in node.attribute if a.name == "value"), None) if node is not None else None
        return numpy_helper.to_array(attr.t) if attr is not None else None

    def past_casts(self, name: str) -> str:
        """`name`, or what it is a Cast of (Casts followed upward)."""
        node = self.producer.get(name)
        while node is not None and node.op_type in ("Cast", "CastLike") and node.domain in ("", "ai.onnx"):
            name = node.input[0]
            node = self.producer.get(name)
        return name


def _attr(node: NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _set_attr(node: NodeProto, name: str, value: int) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(name, value)])


@dataclass(frozen=True)
class _Match:
    """One QMoE layer's graph routing: the nodes it replaces and what the new form needs."""

    moe: NodeProto
    logits: str  # the router's float32 logits [N, E]
    softmax: NodeProto
    topk: NodeProto
    scatter: NodeProto
    log: NodeProto
    total: NodeProto  # ReduceSum(R)
    mul: NodeProto  # the output times sum(R)
    probs_cast: NodeProto | None  # the Cast of Log(R) to the kernel's type
    shared: int  # the shared experts' columns


def _match(g: _Graph, moe: NodeProto) -> _Match | None:
    """`moe`'s graph routing, if it is the exact pattern passes/moe_router_inputs.py writes for a plain
    softmax routing: R = ScatterElements(base row, TopK(Softmax(logits))), router_probs = Cast(Log(R)),
    normalize 1, the output times Cast(ReduceSum(R))."""
    if _attr(moe, "normalize_routing_weights", 0) != 1 or len(moe.input) < 2:
        return None
    log = g.producer_op(g.past_casts(moe.input[1]), "Log")
    scatter = g.producer_op(log.input[0], "ScatterElements") if log is not None else None
    if log is None or scatter is None or _attr(scatter, "axis", 0) not in (1, -1):
        return None
    topk = g.producer_op(scatter.input[2], "TopK")
    if topk is None or list(topk.output[:2]) != [scatter.input[2], scatter.input[1]] or _attr(topk, "largest", 1) != 1:
        return None
    shared = _shared_columns(g, scatter.input[0])
    k = g.constant(topk.input[1])
    softmax = g.producer_op(topk.input[0], "Softmax")
    if shared is None or k is None or k.size != 1 or softmax is None or _attr(softmax, "axis", -1) not in (-1, 1):
        return None
    if int(k.reshape(-1)[0]) + shared != _attr(moe, "k", 1):
        return None
    users = g.consumers.get(scatter.output[0], [])
    total = next((u for u in users if u.op_type == "ReduceSum"), None)
    if total is None or sorted(u.op_type for u in users) != ["Log", "ReduceSum"] or _attr(total, "keepdims", 1) != 1:
        return None
    mul = _mul_of_output(g, moe, total)
    if mul is None or g.only_user(log.output[0]) is None:
        return None
    if any(u is not topk and u.op_type != "Shape" for u in g.consumers.get(softmax.output[0], [])):
        return None  # the probabilities feed the TopK alone (and the Shape of a row of zeros)
    for chosen in topk.output[:2]:  # read by the scatter alone (and the Shape that sizes its base row)
        if chosen in g.outputs or any(u is not scatter and u.op_type != "Shape" for u in g.consumers.get(chosen, [])):
            return None
    probs_cast = g.producer.get(moe.input[1])
    return _Match(
        moe,
        softmax.input[0],
        softmax,
        topk,
        scatter,
        log,
        total,
        mul,
        probs_cast if probs_cast is not log else None,
        shared,
    )


def _shared_columns(g: _Graph, base: str) -> int | None:
    """How many shared experts' columns of ones the scatter's base row ends with: 0 for zeros
    (ConstantOfShape), n for a constant row [0 .. 0, 1 .. 1] spread over the tokens (Expand); None else."""
    zeros = g.producer_op(base, "ConstantOfShape")
    if zeros is not None:
        value = next((a.t for a in zeros.attribute if a.name == "value"), None)
        return 0 if value is None or not numpy_helper.to_array(value).any() else None
    expand = g.producer_op(base, "Expand")
    row = g.constant(expand.input[0]) if expand is not None else None
    if row is None or row.ndim != 2 or row.shape[0] != 1:
        return None
    ones = int(np.count_nonzero(row[0] == 1))
    experts = row.shape[1] - ones
    if experts < 1 or (row[0, :experts] != 0).any() or (row[0, experts:] != 1).any():
        return None
    return ones


def _mul_of_output(g: _Graph, moe: NodeProto, total: NodeProto) -> NodeProto | None:
    """The Mul of `moe`'s output (through Casts) by `total`'s (through Casts), if that is all it feeds."""
    name = moe.output[0]
    user = g.only_user(name)
    while user is not None and user.op_type in ("Cast", "CastLike"):
        name = user.output[0]
        user = g.only_user(name)
    if user is None or user.op_type != "Mul" or name not in user.input:
        return None
    other = user.input[1] if user.input[0] == name else user.input[0]
    return user if g.past_casts(other) == total.output[0] else None


def qmoe_routing_in_kernel(
    model: ModelProto, ops: Sequence[str] = ("QMoE",), nodes: Collection[str] | None = None
) -> int:
    """Rewrite, in `model`'s main graph, the graph routing of every `ops` node (com.microsoft; of those named
    in `nodes`, when given) that has DeepSeek-V2's plain softmax routing into the kernel's own (module
    docstring). Returns how many."""
    graph = model.graph
    chosen = [n for n in graph.node if n.op_type in ops and n.domain == MS_DOMAIN]
    chosen = [n for n in chosen if nodes is None or n.name in nodes]
    if not chosen:  # every CUDA session asks, most have no QMoE: no index of the graph for them
        return 0
    g = _Graph(model)
    matches = [m for m in (_match(g, n) for n in chosen) if m is not None]
    removed: set[int] = set()
    added: dict[int, list[NodeProto]] = defaultdict(list)  # new nodes, before the node at that index
    position = {id(n): i for i, n in enumerate(graph.node)}
    for m in matches:
        name = f"{m.moe.name or m.moe.output[0]}/kernel_routing"
        pads, zero = f"{name}/pads", f"{name}/zero"
        if m.shared:
            graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 0, m.shared], np.int64), pads))
            graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), zero))
        log_probs, padded = f"{name}/log_probs", f"{name}/with_shared"
        new = [helper.make_node("LogSoftmax", [m.logits], [log_probs], name=f"{name}/log_softmax", axis=-1)]
        if m.shared:
            new.append(helper.make_node("Pad", [log_probs, pads, zero], [padded], name=f"{name}/pad", mode="constant"))
        else:
            padded = log_probs
        if m.probs_cast is not None:  # the Cast to the kernel's type now reads the padded log-probabilities
            m.probs_cast.input[0] = padded
        else:
            m.moe.input[1] = padded
        added[position[id(m.softmax)]].extend(new)
        _set_attr(m.moe, "normalize_routing_weights", 0)
        weight_side = 1 if g.past_casts(m.mul.input[1]) == m.total.output[0] else 0
        factor_name = f"{name}/factor"  # in the type the Mul read sum(R) in: its Cast's, else float32
        cast = g.producer.get(m.mul.input[weight_side])
        dtype: int = TensorProto.FLOAT
        if cast is not None and cast.op_type == "Cast":
            dtype = _attr(cast, "to", TensorProto.FLOAT)
        if dtype not in SCALAR_TYPES:
            raise ValueError(f"bug: {m.mul.name} reads the routing's weight sum as {TensorProto.DataType.Name(dtype)}")
        if m.shared:
            graph.initializer.append(numpy_helper.from_array(np.array(1 + m.shared, SCALAR_TYPES[dtype]), factor_name))
            m.mul.input[weight_side] = factor_name
        else:  # times 1: onnxruntime removes the Identity
            output, kept = m.mul.output[0], m.mul.input[1 - weight_side]
            m.mul.CopyFrom(helper.make_node("Identity", [kept], [output], name=m.mul.name))
        for node in (m.softmax, m.topk, m.scatter, m.log, m.total):
            removed.add(id(node))
    if not matches:
        return 0
    rewritten: list[NodeProto] = []
    for index, node in enumerate(graph.node):
        rewritten.extend(added.get(index, []))
        if id(node) not in removed:
            rewritten.append(node)
    del graph.node[:]
    graph.node.extend(_live(rewritten, {o.name for o in graph.output}))
    return len(matches)


def _live(nodes: list[NodeProto], outputs: set[str]) -> list[NodeProto]:
    """`nodes` without those whose outputs nothing reads (the routing's Casts, Expands, shapes), repeatedly."""
    while True:
        read = outputs | {name for n in nodes for name in n.input}
        kept = [n for n in nodes if any(o in read for o in n.output if o)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept
