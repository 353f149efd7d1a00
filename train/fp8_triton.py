"""The FP8 quantizers as Triton kernels: one pass over the input, fp8 values and float32 scales out.

They compute exactly what `fp8_quant.quantize_tiles` and `quantize_blocks` compute on the CPU (same
padding, same values bit for bit: IEEE division, round-to-nearest-even into E4M3, the power of two taken
from the scale's bits; torch on CUDA divides by a scalar as a product with its reciprocal, 1 ulp off),
and read any strided input, so the 128x1 tiles of the backward pass (`tiles(x.t())`) cost no transposed
copy. Why not torch.compile: on the H200 quantizing a bf16 `x` [8192, 7168] took 0.63 ms compiled and
0.09 ms here (one pass over its bytes: 0.04 ms), and the compiled ones cost dynamo's dispatch on every
call (bench/results/train_fp8_gemm_h200_2026-12-01.json). Triton comes with torch's CUDA wheels; where
it is missing, `available()` is False and the compiled quantizers are used.
"""

from __future__ import annotations

import importlib.util

import torch
from dsv3c.train import fp8_quant as fq

_BLOCK_ROWS = 32  # rows of one tile program: 32 x 128 values


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


if available():  # defined only where triton is installed: `import triton` is absent from CPU installs
    import triton
    import triton.language as tl

    @triton.jit
    def _scale_of(amax, POW2: tl.constexpr):
        scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)  # fp8_quant._TINY, FP8_MAX
        if POW2:  # the power of two at or above the scale: its exponent, plus one if any mantissa bit is set
            bits = scale.to(tl.int32, bitcast=True)
            up = tl.where((bits & 0x7FFFFF) != 0, 0x800000, 0)
            scale = ((bits & 0x7F800000) + up).to(tl.float32, bitcast=True)
        return scale

    @triton.jit
    def _tiles_kernel(x, q, s, m, k, sxm, sxk, kt, BLOCK: tl.constexpr, POW2: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.program_id(1) * 128 + tl.arange(0, 128)
        inside = (rows[:, None] < m) & (cols[None, :] < k)
        v = tl.load(x + rows[:, None] * sxm + cols[None, :] * sxk, mask=inside, other=0.0).to(tl.float32)
        scale = _scale_of(tl.max(tl.abs(v), axis=1), POW2)  # [BLOCK]
        out = tl.clamp(tl.math.div_rn(v, scale[:, None]), -448.0, 448.0).to(tl.float8e4nv, fp_downcast_rounding="rtne")
        tl.store(q + rows[:, None] * (kt * 128) + cols[None, :], out, mask=rows[:, None] < m)
        tl.store(s + rows * kt + tl.program_id(1), scale, mask=rows < m)

    @triton.jit
    def _blocks_kernel(w, q, s, n, k, swn, swk, kt, POW2: tl.constexpr):
        rows = tl.program_id(0) * 128 + tl.arange(0, 128)
        cols = tl.program_id(1) * 128 + tl.arange(0, 128)
        inside = (rows[:, None] < n) & (cols[None, :] < k)
        v = tl.load(w + rows[:, None] * swn + cols[None, :] * swk, mask=inside, other=0.0).to(tl.float32)
        scale = _scale_of(tl.max(tl.max(tl.abs(v), axis=1), axis=0), POW2)
        out = tl.clamp(tl.math.div_rn(v, scale), -448.0, 448.0).to(tl.float8e4nv, fp_downcast_rounding="rtne")
        tl.store(q + rows[:, None] * (kt * 128) + cols[None, :], out)
        tl.store(s + tl.program_id(0) * kt + tl.program_id(1), scale)


def quantize_tiles(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K], any strides -> (fp8 [M, Kp] row-major, float32 scales [M, Kp / 128]); as fp8_quant's."""
    m, k = x.shape
    kt = -(-k // fq.TILE)
    q = torch.empty((m, kt * fq.TILE), dtype=fq.FP8, device=x.device)
    s = torch.empty((m, kt), dtype=torch.float32, device=x.device)
    if m:
        grid = (-(-m // _BLOCK_ROWS), kt)
        _tiles_kernel[grid](x, q, s, m, k, x.stride(0), x.stride(1), kt, BLOCK=_BLOCK_ROWS, POW2=pow2)
    return q, s


def quantize_blocks(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K], any strides -> (fp8 [Np, Kp], float32 scales [Np / 128, Kp / 128]); as fp8_quant's."""
    n, k = w.shape
    nt, kt = -(-n // fq.TILE), -(-k // fq.TILE)
    q = torch.empty((nt * fq.TILE, kt * fq.TILE), dtype=fq.FP8, device=w.device)
    s = torch.empty((nt, kt), dtype=torch.float32, device=w.device)
    if nt and kt:
        _blocks_kernel[(nt, kt)](w, q, s, n, k, w.stride(0), w.stride(1), kt, POW2=pow2)
    return q, s
