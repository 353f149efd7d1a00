"""Online FP8 (E4M3) quantization for training, DeepSeek-V3's fine-grained recipe.

- activations: one scale per 1x128 tile along the GEMM's reduction axis (`quantize_tiles`);
- weights: one scale per 128x128 block (`quantize_blocks`), valid for W and for W^T alike;
- per-tensor: one scale for the whole tensor (`quantize_tensor`), the comparison mode.

Scales are amax / 448 (the value that maps the largest |x| to E4M3's largest finite value), or that
rounded up to a power of two (`pow2`: dequantization is then exact in any precision). Tensors whose
reduction axis is not a multiple of 128 are zero-padded to one, so a ragged last tile is an ordinary
tile; the padded shape is what a real FP8 GEMM needs. Every function here is plain torch, so the same
code is the CPU emulation and (compiled) the CUDA quantizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
TILE = 128
_TINY = 1e-12  # an all-zero tile gets a tiny scale: its values quantize to exact zeros anyway


def _scale(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    scale = amax.float().clamp(min=_TINY) / FP8_MAX
    if not pow2:
        return scale
    # the power of two at or above the scale, from its bits (positive and normal): the exponent, plus one
    # if any mantissa bit is set; exp2(ceil(log2(s))) in float32 misses it when log2 rounds to an integer
    bits = scale.view(torch.int32)
    up = (bits & 0x7FFFFF).ne(0).to(torch.int32) << 23
    return ((bits & 0x7F800000) + up).view(torch.float32)


def pad_to(x: torch.Tensor, multiple: int, dim: int) -> torch.Tensor:
    """Zero-pad `dim` of x up to a multiple of `multiple` (no copy when it already is one)."""
    size = x.shape[dim]
    extra = -size % multiple
    if not extra:
        return x
    pad = [0, 0] * x.dim()
    pad[2 * (x.dim() - 1 - dim) + 1] = extra
    return F.pad(x, pad)


def quantize_tiles(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, Kp], float32 scales [M, Kp / 128]); one scale per 1x128 tile along K."""
    x = pad_to(x, TILE, 1).contiguous()  # row-major fp8 out: what the GEMM wants (also for x.t())
    m, k = x.shape
    tiles = x.float().view(m, k // TILE, TILE)  # [M, K/128, 128]
    scale = _scale(tiles.abs().amax(-1), pow2)  # [M, K/128]
    q = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(m, k), scale


def quantize_blocks(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (fp8 [Np, Kp], float32 scales [Np / 128, Kp / 128]); one scale per 128x128 block."""
    w = pad_to(pad_to(w, TILE, 0), TILE, 1)
    n, k = w.shape
    blocks = w.float().view(n // TILE, TILE, k // TILE, TILE)  # [N/128, 128, K/128, 128]
    scale = _scale(blocks.abs().amax(dim=(1, 3)), pow2)  # [N/128, K/128]
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(n, k), scale


def quantize_tensor(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (fp8 [R, C], float32 scale []): one scale for everything."""
    scale = _scale(x.abs().amax(), pow2)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 [M, Kp] with scales [M, Kp / 128] -> float32 [M, Kp]."""
    m, k = q.shape
    return (q.float().view(m, k // TILE, TILE) * scale[..., None]).view(m, k)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 [Np, Kp] with scales [Np / 128, Kp / 128] -> float32 [Np, Kp]."""
    n, k = q.shape
    return (q.float().view(n // TILE, TILE, k // TILE, TILE) * scale[:, None, :, None]).view(n, k)
