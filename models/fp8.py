"""DeepSeek-V3 block FP8: E4M3 weights with one float32 `weight_scale_inv` per [128, 128] block.

Dequantization is DeepSeek's: `w = fp8.float() * scale_inv` over each block, edge blocks cropped.

Quantization uses `scale_inv = amax(block) / 448`, with two refinements so that quantizing an
already-dequantized grid gives back the same bytes (save(load(fp8 checkpoint)) == the checkpoint):

- a grid is recognised: for a block whose values all sit on fp8 values times ~amax / 448, the scale is
  searched within 2 ulps for one that reproduces every value exactly (this recovers DeepSeek's scales,
  whose largest |fp8| in a block is 448);
- otherwise the scale is snapped to a fixed point of s -> fl(fl(448 s) / 448) (at most 1 ulp away),
  so that the grid we write is itself recognised when it is read back and quantized again.

An all-zero block gets scale 1.0 (its dequantized values are exact zeros either way; a constant makes
the round trip stable). Exactness needs float32 dequantized values: a bf16 copy loses the low bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
Block = tuple[int, int]
DEFAULT_BLOCK: Block = (128, 128)


def scale_shape(shape: tuple[int, ...] | torch.Size, block: Block = DEFAULT_BLOCK) -> tuple[int, int]:
    """[ceil(out / block_out), ceil(in / block_in)] for a 2-D weight of `shape`."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequantize_block_fp8(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: Block = DEFAULT_BLOCK) -> torch.Tensor:
    """fp8 [out, in] and scales [ceil(out/bo), ceil(in/bi)] -> float32 [out, in]."""
    return w_fp8.float() * _expand(scale_inv.float(), w_fp8.shape, block)


@dataclass
class GridStats:
    """What grid recognition found over the blocks quantized: how many looked like a dequantized fp8 grid,
    and of those how many it reproduced exactly (the rest were quantized afresh and moved)."""

    blocks: int = 0
    on_grid: int = 0
    reproduced: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"blocks": self.blocks, "on_grid": self.on_grid, "reproduced_exactly": self.reproduced}


def quantize_block_fp8(
    w: torch.Tensor, block: Block = DEFAULT_BLOCK, stats: GridStats | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] -> (fp8 [out, in], float32 scale_inv [ceil(out/bo), ceil(in/bi)]); `stats` counts
    the blocks grid recognition saw and reproduced."""
    if w.dim() != 2:
        raise ValueError(f"block fp8 quantizes 2-D weights, got shape {list(w.shape)}")
    w = w.float()
    amax = _block_reduce(w.abs(), block, "amax")
    zero = amax == 0
    base = _snap(torch.where(zero, 1.0, amax / FP8_MAX))
    scale, todo = base, _maybe_grid(w, base, block) & ~zero
    on_grid = int(todo.sum())
    for step in (0, -1, 1, -2, 2):  # the grid search described in the module docstring
        if not bool(todo.any()):
            break
        candidate = _ulp_step(base, step)
        exact = _block_reduce(dequantize_block_fp8(_cast(w, candidate, block), candidate, block) == w, block, "all")
        scale = torch.where(exact & todo, candidate, scale)
        todo &= ~exact
    if stats is not None:
        stats.blocks += zero.numel()
        stats.on_grid += on_grid
        stats.reproduced += on_grid - int(todo.sum())
    return _cast(w, scale, block), scale


def _maybe_grid(w: torch.Tensor, scale: torch.Tensor, block: Block) -> torch.Tensor:
    """Blocks whose values all lie within 2^-16 (relative) of fp8 values times `scale`: candidate grids.

    A dequantized grid lies within a few float32 ulps; trained or random weights almost never do, so
    they skip the search.
    """
    ratio = w / _expand(scale, w.shape, block)
    q = ratio.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()
    return _block_reduce((ratio - q).abs() <= q.abs() * 2**-16, block, "all")


def _snap(scale: torch.Tensor) -> torch.Tensor:
    """The fixed point of s -> fl(fl(448 s) / 448) nearest s (the map is idempotent in float32)."""
    return (scale * FP8_MAX) / FP8_MAX


def _ulp_step(scale: torch.Tensor, steps: int) -> torch.Tensor:
    """Move positive float32 values by `steps` units in the last place."""
    return (scale.view(torch.int32) + steps).view(torch.float32) if steps else scale


def _cast(w: torch.Tensor, scale: torch.Tensor, block: Block) -> torch.Tensor:
    # clamp: rounding may land a hair above 448, and E4M3FN has no infinity to saturate to
    return (w / _expand(scale, w.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _expand(scale: torch.Tensor, shape: tuple[int, ...] | torch.Size, block: Block) -> torch.Tensor:
    """Per-block scales [R, C] -> per-element [out, in]; partial edge blocks cropped."""
    full = scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)  # [R*bo, C*bi]
    return full[: shape[0], : shape[1]]


def _block_reduce(x: torch.Tensor, block: Block, how: str) -> torch.Tensor:
    """amax or all over each block of x [out, in] -> [R, C]; padding is neutral (0 / True)."""
    rows, cols = scale_shape(x.shape, block)
    pad_value = True if x.dtype == torch.bool else 0
    padded = x.new_full((rows * block[0], cols * block[1]), pad_value)
    padded[: x.shape[0], : x.shape[1]] = x
    blocks = padded.view(rows, block[0], cols, block[1])  # [R, bo, C, bi]
    return blocks.amax(dim=(1, 3)) if how == "amax" else blocks.all(dim=3).all(dim=1)
