"""MXFP8 activations in a graph: per token, per 32 channels, an E8M0 (power-of-two) scale, E4M3 values.

Two forms of the same numbers, chosen by what runs the graph:

    TRT        trt::TRT_MXFP8DynamicQuantize(x) -> (E4M3 x, E8M0 scales)    what TensorRT's ONNX parser turns
               trt::TRT_MXFP8DequantizeLinear(q, scales) -> float           into an IDynamicQuantizeLayer
                                                                            (block 32, axis -1, fp8 + E8M0)
    EMULATED   standard ONNX, for onnxruntime and any other runtime:
               x [..., K] -> Pad to 32 C -> Reshape [..., C, 32]
               amax = ReduceMax(Abs) [..., C, 1];  s = 2^ceil(log2(max(amax / 448, 2^-126)))
               QuantizeLinear(x, s, axis=-1, block_size=32) -> FLOAT8E4M3FN -> DequantizeLinear(s)
               -> Reshape [..., 32 C] -> Slice [..., :K]

The scale rounds amax / 448 *up* to a power of two, as cuDNN's block-scale quantize (`scale =
quantize_round_up(amax / vmax)`) and NVIDIA's MXFP8 training recipe do, so no value is clipped; the OCP
MX spec's 2^(floor(log2 amax) - 8) differs from it only in the blocks it clips. E8M0 reaches 2^-127;
the float32 graph floors at 2^-126 (float32's smallest normal), which matters only for blocks whose amax
is below 2^-117. log2 in float32 can miss an exact power of two by one ulp, so the emulation corrects
the rounded exponent by one step either way: s is the smallest power of two >= amax / 448.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from dsv3c.export.builder import Builder
from dsv3c.models.fp8 import FP8_MAX

MX_BLOCK = 32  # the only block TensorRT's dynamic quantization takes for FP8 (TensorRT-RTX 1.7, measured)
TRT_DOMAIN = "trt"
TRT_DYNAMIC_QUANTIZE = "TRT_MXFP8DynamicQuantize"
TRT_DEQUANTIZE = "TRT_MXFP8DequantizeLinear"
SCALE_FLOOR = 2.0**-126
FP8 = ir.DataType.FLOAT8E4M3FN


def _pad_blocks(b: Builder, h: ir.Value, rank: int, k: int) -> ir.Value:
    pad = -k % MX_BLOCK
    if not pad:
        return h
    out: ir.Value = b.op("Pad", h, b.ints(*([0] * (2 * rank - 1) + [pad]), name="pads"), name="pad")  # [..., Kp]
    return out


def _crop(b: Builder, y: ir.Value, k: int) -> ir.Value:
    if k % MX_BLOCK == 0:
        return y
    start, end, axes = b.ints(0, name="start"), b.ints(k, name="end"), b.ints(-1, name="axes")
    out: ir.Value = b.op("Slice", y, start, end, axes, name="crop")  # [..., K]
    return out


def pow2_at_least(b: Builder, s: ir.Value) -> ir.Value:
    """The smallest power of two >= s (s > 0, float32): 2^ceil(log2 s), corrected by one step either way."""
    two = b.const(np.float32(2.0), name="two")
    log2 = b.op("Div", b.op("Log", s), b.const(np.float32(math.log(2.0)), name="ln2"), name="log2")
    p = b.op("Pow", two, b.op("Ceil", log2, name="exponent"), name="pow2")
    p = b.op("Where", b.op("Less", p, s, name="too_small"), b.op("Mul", p, two, name="doubled"), p, name="pow2_up")
    half = b.op("Div", p, two, name="halved")
    out: ir.Value = b.op("Where", b.op("GreaterOrEqual", half, s, name="too_big"), half, p, name="e8m0_scale")
    return out


def mxfp8_emulated(b: Builder, h: ir.Value, rank: int, k: int) -> ir.Value:
    """h [..., K] float32 -> its MXFP8 round trip in standard ONNX ops (float32, [..., K])."""
    blocks = -(-k // MX_BLOCK)
    x = _pad_blocks(b, h, rank, k)
    t = b.op("Reshape", x, b.ints(*([0] * (rank - 1) + [blocks, MX_BLOCK]), name="blocks"), name="to_blocks")
    amax = b.op("ReduceMax", b.op("Abs", t), b.ints(-1, name="axes"), keepdims=1, name="amax")  # [..., C, 1]
    s = b.op("Div", amax, b.const(np.float32(FP8_MAX), name="fp8_max"), name="amax_over_max")
    s = pow2_at_least(b, b.op("Max", s, b.const(np.float32(SCALE_FLOOR), name="floor"), name="floored"))
    q = b.op("QuantizeLinear", t, s, name="quantize", output_dtype=FP8, axis=-1, block_size=MX_BLOCK)
    d = b.op("DequantizeLinear", q, s, name="dequantize", axis=-1, block_size=MX_BLOCK)
    y = b.op("Reshape", d, b.ints(*([0] * (rank - 1) + [blocks * MX_BLOCK]), name="channels"), name="from_blocks")
    return _crop(b, y, k)


def mxfp8_trt(b: Builder, h: ir.Value, rank: int, k: int) -> ir.Value:
    """h [..., K] float32 -> TensorRT's dynamic MXFP8 quantize + dequantize (float32, [..., K])."""
    x = _pad_blocks(b, h, rank, k)
    blocked = {"axis": -1, "block_size": MX_BLOCK}
    q, scales = b.op(
        TRT_DYNAMIC_QUANTIZE, x, name="mxfp8_quantize", domain=TRT_DOMAIN, num_outputs=2, output_dtype=FP8, **blocked
    )
    q.dtype, scales.dtype = FP8, ir.DataType.FLOAT8E8M0
    if x.shape is not None:
        *lead, width = x.shape.dims
        q.shape = ir.Shape(x.shape.dims)
        scales.shape = ir.Shape([*lead, -(-k // MX_BLOCK) if isinstance(width, int) else width])
    d = b.op(
        TRT_DEQUANTIZE, q, scales, name="mxfp8_dequantize", domain=TRT_DOMAIN, output_dtype=ir.DataType.FLOAT, **blocked
    )
    d.dtype = ir.DataType.FLOAT
    if x.shape is not None:
        d.shape = ir.Shape(x.shape.dims)
    return _crop(b, d, k)


def mxfp8_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float weight [..., N, K] (K % 32 == 0) as MXFP8 along K: (E4M3 values, float32 power-of-two scales
    [..., N, K / 32]), with the activations' scale rule (the smallest power of two >= amax / 448)."""
    import ml_dtypes

    blocks = w.astype(np.float32).reshape(*w.shape[:-1], -1, MX_BLOCK)  # [..., N, K / 32, 32]
    ratio = np.maximum(np.abs(blocks).max(axis=-1) / np.float32(FP8_MAX), np.float32(SCALE_FLOOR))
    mantissa, exponent = np.frexp(ratio)  # ratio = mantissa 2^exponent, mantissa in [0.5, 1)
    scale = np.ldexp(np.float32(1.0), np.where(mantissa == 0.5, exponent - 1, exponent)).astype(np.float32)
    q = (blocks / scale[..., None]).astype(ml_dtypes.float8_e4m3fn).reshape(w.shape)
    return q, scale


def e8m0_bytes(scale: np.ndarray) -> np.ndarray:
    """Power-of-two float32 scales as E8M0 (the biased exponent, uint8), as TensorRT's parser takes them."""
    return (np.log2(scale).astype(np.int32) + 127).astype(np.uint8)
