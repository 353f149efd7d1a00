"""Summary statistics of initializers, streamed in chunks so that memory stays bounded per tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from dsv3c.graph.load import LoadedGraph, iter_chunks
from dsv3c.onnxkit.dtypes import numpy_dtype

CHUNK = 1 << 22  # elements per piece: 16 MiB of float32 at a time


@dataclass(frozen=True)
class TensorStats:
    mean: float
    std: float
    min: float
    max: float
    absmax: float
    nonfinite: int


@dataclass(frozen=True)
class TensorComparison:
    equal: bool
    stats_a: TensorStats | None
    stats_b: TensorStats | None
    max_abs_diff: float | None  # same shape only


class _Running:
    def __init__(self) -> None:
        self.n, self.total, self.squares, self.bad = 0, 0.0, 0.0, 0
        self.lo, self.hi, self.absmax = math.inf, -math.inf, 0.0

    def add(self, chunk: np.ndarray) -> None:
        x = chunk.astype(np.float64)
        finite = np.isfinite(x)
        bad = int(x.size - finite.sum())
        self.bad += bad
        x = x[finite] if bad else x
        if x.size:
            self.n += x.size
            self.total += float(x.sum())
            self.squares += float(np.square(x).sum())
            self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
            self.absmax = max(self.absmax, float(np.abs(x).max()))

    def result(self) -> TensorStats:
        if not self.n:
            return TensorStats(0.0, 0.0, 0.0, 0.0, 0.0, self.bad)
        mean = self.total / self.n
        var = max(self.squares / self.n - mean * mean, 0.0)
        return TensorStats(mean, math.sqrt(var), self.lo, self.hi, self.absmax, self.bad)


def readable(g: LoadedGraph, name: str) -> bool:
    info = g.tensors.get(name)
    return info is not None and info.data != "missing" and numpy_dtype(info.elem_type) is not None


def _numeric(chunk: np.ndarray) -> np.ndarray:
    return chunk if chunk.dtype.kind in "fiub" else chunk.astype(np.float32)  # fp8 / bf16 (ml_dtypes)


def tensor_stats(g: LoadedGraph, name: str) -> TensorStats | None:
    if not readable(g, name):
        return None
    running = _Running()
    for chunk in iter_chunks(g, name, CHUNK):
        running.add(_numeric(chunk))
    return running.result()


def _same_bytes(a: LoadedGraph, x: str, b: LoadedGraph, y: str) -> bool:
    ta, tb = a.tensors[x], b.tensors[y]
    if ta.data == tb.data == "external" and (ta.location, ta.offset, ta.length) == (tb.location, tb.offset, tb.length):
        same_file = (a.path.resolve().parent / ta.location).resolve() == (
            b.path.resolve().parent / tb.location
        ).resolve()
        if same_file:
            return True
    for ca, cb in zip(iter_chunks(a, x, CHUNK), iter_chunks(b, y, CHUNK), strict=False):
        if ca.tobytes() != cb.tobytes():
            return False
    return True


def compare_tensors(a: LoadedGraph, x: str, b: LoadedGraph, y: str) -> TensorComparison | None:
    """Compare initializer `x` of A with `y` of B; None when either has no readable data."""
    if not (readable(a, x) and readable(b, y)):
        return None
    ta, tb = a.tensors[x], b.tensors[y]
    if (ta.elem_type, ta.shape) == (tb.elem_type, tb.shape) and _same_bytes(a, x, b, y):
        return TensorComparison(True, None, None, 0.0)
    ra, rb, diff = _Running(), _Running(), None
    if ta.shape == tb.shape:
        diff = 0.0
        for ca, cb in zip(iter_chunks(a, x, CHUNK), iter_chunks(b, y, CHUNK), strict=True):
            fa, fb = _numeric(ca), _numeric(cb)
            ra.add(fa)
            rb.add(fb)
            delta = np.abs(fa.astype(np.float64) - fb.astype(np.float64))
            diff = max(diff, float(np.nanmax(delta)) if delta.size else 0.0)
        return TensorComparison(False, ra.result(), rb.result(), diff)
    return TensorComparison(False, tensor_stats(a, x), tensor_stats(b, y), None)
