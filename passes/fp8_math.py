"""The FP8 arithmetic the quantize passes put into graphs, once in numpy/torch (weights) and as formulas.

Weights, block scheme: DeepSeek's `weight_scale_inv` per [128, 128] block (models/fp8.py; re-quantizing
a dequantized FP8 checkpoint gives back its bytes). Tensor scheme: one scale per weight matrix (per
expert for stacked experts), amax / 448. Activations: scale = max(amax, AMAX_FLOOR) / 448 over a 1 x 128
tile of one token (or the whole tensor), optionally rounded up to a power of two; q = fp8(x / scale).
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
from dsv3c.export.builder import static_dims
from dsv3c.models.fp8 import FP8_DTYPE, FP8_MAX, Block, GridStats, quantize_block_fp8

AMAX_FLOOR = 1e-4  # DeepGEMM's clamp: an all-zero tile gets a finite scale
TILE = 128


class WeightScheme(enum.Enum):
    BLOCK = "block"  # one scale per 128x128 block (DeepSeek)
    TENSOR = "tensor"  # one scale per weight matrix


class ActScheme(enum.Enum):
    TILE = "tile"  # online, per token per 128 channels (DeepSeek)
    TENSOR = "tensor"  # online, one scale for the whole activation tensor
    STATIC = "static"  # calibrated per-tensor scale, a constant in the graph


def act_scale(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    """The activation scale for `amax` (the in-graph formula, float32)."""
    s = torch.clamp(amax.float(), min=AMAX_FLOOR) / FP8_MAX
    return torch.pow(2.0, torch.ceil(torch.log(s) / math.log(2.0))) if pow2 else s


def fake_quant_activation(
    x: torch.Tensor, scheme: ActScheme, pow2: bool, static_amax: float | None = None
) -> torch.Tensor:
    """PyTorch reference of the graph's activation Q/DQ: x [..., K] -> dequantized fp8 x (float32)."""
    x = x.float()
    if scheme == ActScheme.STATIC:
        assert static_amax is not None
        s = act_scale(torch.tensor(static_amax), pow2)
        return (x / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s
    if scheme == ActScheme.TENSOR:
        s = act_scale(x.abs().amax(), pow2)
        return (x / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s
    k = x.shape[-1]
    pad = -k % TILE
    tiles = torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, TILE))  # [..., C, 128]
    s = act_scale(tiles.abs().amax(dim=-1, keepdim=True), pow2)  # [..., C, 1]
    q = (tiles / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s
    return q.flatten(-2)[..., :k]


def quantize_tensor_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for all of w: (fp8 w, float32 scalar scale); an all-zero w gets scale 1."""
    amax = w.float().abs().amax()
    scale = torch.where(amax == 0, torch.tensor(1.0), amax / FP8_MAX)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_weight(
    w: torch.Tensor, scheme: WeightScheme, block: Block, stats: GridStats | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] or stacked [E, out, in] -> (fp8, scales): block [(E,) R, C]; tensor [] or [E]."""
    if w.dim() == 3:
        parts = [quantize_weight(w[e], scheme, block, stats) for e in range(w.shape[0])]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    return quantize_block_fp8(w, block, stats) if scheme == WeightScheme.BLOCK else quantize_tensor_fp8(w)


def scale_dims(shape: tuple[int, ...], scheme: WeightScheme, block: Block) -> tuple[int, ...]:
    *lead, out, inp = shape
    if scheme == WeightScheme.TENSOR:
        return tuple(lead)
    return (*lead, -(-out // block[0]), -(-inp // block[1]))


def to_torch(tensor: ir.TensorProtocol) -> torch.Tensor:
    array = np.asarray(tensor.numpy())
    return torch.from_numpy(np.array(array, dtype=np.float32))  # a writable float32 copy


def fp8_to_numpy(q: torch.Tensor) -> np.ndarray:
    return q.contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)


class WeightQuantizer:
    """Lazy fp8 tensors for a weight: the fp8 bytes and the scales come from one quantization, computed
    when the writer asks for them (a small cache holds the last few, so the pair is computed once).

    Block scheme: grid recognition (models/fp8.py) is the fallback that gives back the bytes of a float
    export of FP8 weights; `grid` counts its blocks over all weights, `moved` names the weights with a
    block that looked like a grid but was not reproduced exactly (recorded in the manifest).
    """

    def __init__(self, scheme: WeightScheme, block: Block, cache_size: int = 4) -> None:
        self.scheme, self.block, self.cache_size = scheme, block, cache_size
        self.grid = GridStats()
        self.moved: list[str] = []
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _quantized(self, name: str, source: ir.TensorProtocol) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._cache:
            stats = GridStats()
            q, s = quantize_weight(to_torch(source), self.scheme, self.block, stats)
            self._cache[name] = (fp8_to_numpy(q), s.float().numpy())
            if stats.reproduced < stats.on_grid:
                self.moved.append(name)
            for key in ("blocks", "on_grid", "reproduced"):
                setattr(self.grid, key, getattr(self.grid, key) + getattr(stats, key))
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(name)
        return self._cache[name]

    def lazy(self, name: str, source: ir.TensorProtocol) -> tuple[ir.LazyTensor, ir.LazyTensor]:
        """(fp8 weight, float32 scales) for the float weight `source`, computed on first use."""
        shape = static_dims(source.shape)

        def part(i: int) -> Callable[[], ir.TensorProtocol]:
            return lambda: ir.tensor(self._quantized(name, source)[i])

        scale_name = name + "_scale_inv" if self.scheme == WeightScheme.BLOCK else name + "_scale"
        weight = ir.LazyTensor(part(0), ir.DataType.FLOAT8E4M3FN, ir.Shape(shape), name=name)
        dims = scale_dims(shape, self.scheme, self.block)
        scale = ir.LazyTensor(part(1), ir.DataType.FLOAT, ir.Shape(dims), name=scale_name)
        return weight, scale
