"""Preallocated latent-cache buffers: per layer c_kv [B, capacity, r] and k_pe [B, capacity, rope].

The decode graph masks every slot j >= positions[b, 0], so the whole buffer can be bound as the past
without copying. Capacity grows in chunks (one copy per chunk, never per step), which bounds the
wasted attention work to one chunk.
"""

from __future__ import annotations

import numpy as np

GROWTH_CHUNK = 64


class LatentBuffers:
    def __init__(self, layers: int, batch: int, widths: tuple[int, int], dtype: np.dtype, capacity: int):
        self.widths, self.dtype = widths, dtype
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.ckv = [np.zeros((batch, capacity, widths[0]), dtype) for _ in range(layers)]
        self.kpe = [np.zeros((batch, capacity, widths[1]), dtype) for _ in range(layers)]

    @property
    def capacity(self) -> int:
        return self.ckv[0].shape[1]

    def reserve(self, needed: int) -> None:
        """Make room for `needed` slots per row, growing by whole chunks."""
        if needed <= self.capacity:
            return
        capacity = -(-needed // GROWTH_CHUNK) * GROWTH_CHUNK
        for buffers in (self.ckv, self.kpe):
            for i, old in enumerate(buffers):
                new = np.zeros((old.shape[0], capacity, old.shape[2]), old.dtype)
                new[:, : old.shape[1]] = old
                buffers[i] = new

    def write(self, layer: int, ckv: np.ndarray, kpe: np.ndarray, start: np.ndarray) -> None:
        """Store q new entries per row [B, q, *] at slots start[b] .. start[b] + q - 1."""
        q = ckv.shape[1]
        self.reserve(int(start.max()) + q)
        rows = np.arange(len(start))[:, None]
        slots = start[:, None] + np.arange(q)  # [B, q]
        self.ckv[layer][rows, slots] = ckv
        self.kpe[layer][rows, slots] = kpe
