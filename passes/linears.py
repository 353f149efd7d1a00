"""Where the linears of an exported graph are, by weight name.

The exporter writes a linear as `MatMul(x, Transpose(W))` with W [out, in] a checkpoint-named
initializer; MLA's kv_b_proj weight feeds the `dsv3c::MLAAttention` node directly (input 4); the MoE's
router [E, D] and stacked expert weights [E, out, in] feed the `dsv3c::MoE` node (inputs 1, 3, 4, 5).
A weight may already be quantized: then a DequantizeLinear (and a Cast) sits between it and its user.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import onnx_ir as ir
from dsv3c.export.onnx_ops import DOMAIN, MLA_OP, MOE_OP

MLA_WEIGHT_INPUT = 4
MOE_ROUTER_INPUT = 1
MOE_EXPERT_INPUTS = (3, 4, 5)  # gate [E, ff, D], up [E, ff, D], down [E, D, ff]


class LinearKind(enum.Enum):
    MATMUL = "matmul"  # MatMul(x, Transpose(W)): the activation x is in the graph
    MLA_KV_B = "mla-kv-b"  # the attention core applies it to the latent cache
    MOE_ROUTER = "moe-router"
    MOE_EXPERTS = "moe-experts"  # stacked [E, out, in]; the MoE node applies them


@dataclass(frozen=True)
class Linear:
    weight: ir.Value  # the initializer
    kind: LinearKind
    user: ir.Node  # MatMul, MLAAttention or MoE
    input_index: int  # which input of `user` the (transposed, dequantized) weight feeds

    @property
    def name(self) -> str:
        assert self.weight.name is not None
        return self.weight.name

    @property
    def activation(self) -> ir.Value | None:
        return self.user.inputs[0] if self.kind == LinearKind.MATMUL else None


def weight_source(
    value: ir.Value | None, through: frozenset[str] = frozenset({"DequantizeLinear", "Cast"})
) -> ir.Value | None:
    """The initializer behind `value`, looking through a weight's DequantizeLinear / Cast; None if none."""
    for _ in range(3):
        if value is None:
            return None
        if value.is_initializer():
            return value
        producer = value.producer()
        if producer is None or producer.op_type not in through or producer.domain not in ("", "ai.onnx"):
            return None
        value = producer.inputs[0]
    return None


def _transposed_weight(node: ir.Node) -> ir.Value | None:
    value = node.inputs[1] if len(node.inputs) > 1 else None
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Transpose":
        return None
    perm = producer.attributes.get("perm")
    if perm is not None and list(perm.as_ints()) != [1, 0]:
        return None
    weight = weight_source(producer.inputs[0])
    return weight if weight is not None and weight.shape is not None and len(weight.shape) == 2 else None


def find_linears(graph: ir.Graph) -> list[Linear]:
    """Every linear of `graph` in graph order (a weight used twice appears twice)."""
    found = []
    for node in graph:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            weight = _transposed_weight(node)
            if weight is not None:
                found.append(Linear(weight, LinearKind.MATMUL, node, 1))
        elif node.domain == DOMAIN and node.op_type == MLA_OP:
            weight = weight_source(node.inputs[MLA_WEIGHT_INPUT])
            if weight is not None:
                found.append(Linear(weight, LinearKind.MLA_KV_B, node, MLA_WEIGHT_INPUT))
        elif node.domain == DOMAIN and node.op_type == MOE_OP:
            router = weight_source(node.inputs[MOE_ROUTER_INPUT])
            if router is not None:
                found.append(Linear(router, LinearKind.MOE_ROUTER, node, MOE_ROUTER_INPUT))
            for index in MOE_EXPERT_INPUTS:
                weight = weight_source(node.inputs[index])
                if weight is not None:
                    found.append(Linear(weight, LinearKind.MOE_EXPERTS, node, index))
    return found


def layer_of(name: str) -> str:
    """`model.layers.3.mlp.down_proj.weight` -> `layers.3`; `mtp.0.block...` -> `mtp.0`; else the first word."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 2:
        return f"layers.{parts[2]}"
    if parts[0] == "mtp" and len(parts) > 1:
        return f"mtp.{parts[1]}"
    return parts[0] if parts[0] != "model" or len(parts) < 2 else parts[1]
