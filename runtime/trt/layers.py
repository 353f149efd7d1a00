"""What a parsed TensorRT network holds: layer types, fp8 layers, native attention / rotary / MoE layers.

Read from the INetworkDefinition before building, because a built engine cannot be inspected without a
GPU it runs on. TensorRT-RTX networks are strongly typed, so a layer's precision is its tensors' types: a
layer is fp8 when it reads or writes an fp8 tensor (Q/DQ layers, fp8 weight constants). A matmul whose two
operands come from fp8 dequantize layers (through shuffles) is what TensorRT fuses into an fp8 GEMM; with
only the weight from fp8 it is a weight-only fp8 GEMM (dequantize, then a higher-precision GEMM).
"""

from __future__ import annotations

import collections
from typing import Any

from dsv3c.artifact.engine_manifest import LayerSummary
from dsv3c.runtime.trt.backend import TensorRTModule

_PASS_THROUGH = {"SHUFFLE", "IDENTITY", "SLICE", "CONCATENATION"}  # what may sit between a DQ and a matmul
_NATIVE = {
    "ATTENTION_INPUT": "attention",
    "ROTARY_EMBEDDING": "rotary",
    "MOE": "moe",
    "KV_CACHE_UPDATE": "kv_cache_update",
    "DYNAMIC_QUANTIZE": "dynamic_quantize",
}


def layer_type(layer: Any) -> str:
    return str(layer.type).rsplit(".", 1)[-1]


def _tensors(layer: Any, which: str) -> list[Any]:
    count = layer.num_inputs if which == "in" else layer.num_outputs
    get = layer.get_input if which == "in" else layer.get_output
    return [t for t in (get(i) for i in range(count)) if t is not None]


def summarize(backend: TensorRTModule, network: Any) -> LayerSummary:
    fp8 = backend.trt.DataType.FP8
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producer = {t.name: layer for layer in layers for t in _tensors(layer, "out")}
    summary = LayerSummary(total=len(layers))
    counts: collections.Counter[str] = collections.Counter()

    def from_fp8(tensor: Any, depth: int = 0) -> bool:
        """Whether `tensor` is a dequantized fp8 value (through layout-only layers)."""
        layer = producer.get(tensor.name)
        if layer is None or depth > 8:
            return False
        kind = layer_type(layer)
        if kind == "DEQUANTIZE":
            return any(t.dtype == fp8 for t in _tensors(layer, "in")[:1])
        return kind in _PASS_THROUGH and any(from_fp8(t, depth + 1) for t in _tensors(layer, "in")[:1])

    for layer in layers:
        kind = layer_type(layer)
        counts[kind] += 1
        if any(t.dtype == fp8 for t in _tensors(layer, "in") + _tensors(layer, "out")):
            summary.fp8.append(layer.name)
        if kind in _NATIVE:
            getattr(summary, _NATIVE[kind]).append(layer.name)
        if kind == "MATRIX_MULTIPLY":
            quantized = [from_fp8(t) for t in _tensors(layer, "in")[:2]]
            if all(quantized):
                summary.fp8_gemms.append(layer.name)
            elif any(quantized):
                summary.fp8_weight_gemms.append(layer.name)
    summary.by_type = dict(counts.most_common())
    return summary


def allow_attention_decomposition(backend: TensorRTModule, network: Any) -> int:
    """Let TensorRT decompose native attention it has no fused kernel for; returns how many it touched."""
    touched = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer_type(layer) == "ATTENTION_INPUT":
            layer.__class__ = backend.trt.IAttentionInputLayer  # the bindings' downcast
            layer.attention.decomposable = True
            touched += 1
    return touched
