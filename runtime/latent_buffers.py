"""Preallocated latent-cache buffers: per layer c_kv [B, capacity, r] and k_pe [B, capacity, rope].

The graphs mask every past slot j >= positions[b, 0], so a whole buffer can be bound as the past without
copying, and a step's new entries are scattered to slots positions[b, i] (B * q entries, never the whole
cache). Capacity grows by whole chunks (one copy per chunk, never per step), which also bounds the masked
attention work wasted on unused slots. Buffers are torch tensors, so the same code serves onnxruntime
(bound by pointer) and PyTorch, on CPU or CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROWTH_CHUNK = 256


@dataclass(frozen=True)
class CacheShape:
    """What every engine's latent cache looks like: decoder layers, c_kv and k_pe widths, value dtype."""

    layers: int
    ckv_width: int
    kpe_width: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token adds to one row: (r + rope) x layers x bytes per value."""
        return (self.ckv_width + self.kpe_width) * self.layers * self.dtype.itemsize

    def allocate(
        self, batch: int, capacity: int, device: torch.device, mtp: bool
    ) -> tuple[LatentBuffers, LatentBuffers | None]:
        """The main cache, and the MTP module's one-layer cache when `mtp`."""
        widths = (self.ckv_width, self.kpe_width)
        main = LatentBuffers(self.layers, batch, widths, self.dtype, device, capacity)
        return main, LatentBuffers(1, batch, widths, self.dtype, device, capacity) if mtp else None


class LatentBuffers:
    def __init__(
        self,
        layers: int,
        batch: int,
        widths: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        capacity: int,
    ):
        self.widths, self.dtype, self.device = widths, dtype, device
        capacity = _round_up(max(capacity, 1))
        # one tensor per kind [layers, B, capacity, width], the layers its views: every layer's new entries
        # can then be written by one scatter (write_layers) instead of one per layer
        self.ckv_layers = torch.zeros(layers, batch, capacity, widths[0], dtype=dtype, device=device)
        self.kpe_layers = torch.zeros(layers, batch, capacity, widths[1], dtype=dtype, device=device)
        self.ckv, self.kpe = list(self.ckv_layers.unbind(0)), list(self.kpe_layers.unbind(0))

    @property
    def capacity(self) -> int:
        return self.ckv[0].shape[1]

    @property
    def batch(self) -> int:
        return self.ckv[0].shape[0]

    @property
    def bytes_per_token(self) -> int:
        return CacheShape(len(self.ckv), *self.widths, self.dtype).bytes_per_token

    def reserve(self, needed: int) -> None:
        """Make room for `needed` slots per row, growing by whole chunks (one copy per chunk)."""
        if needed <= self.capacity:
            return
        capacity = _round_up(max(needed, self.capacity + self.capacity // 4))
        grown = []
        for old in (self.ckv_layers, self.kpe_layers):
            new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, : old.shape[2]] = old
            grown.append(new)
        self.ckv_layers, self.kpe_layers = grown
        self.ckv, self.kpe = list(self.ckv_layers.unbind(0)), list(self.kpe_layers.unbind(0))

    def write(self, layer: int, ckv: torch.Tensor, kpe: torch.Tensor, positions: torch.Tensor) -> None:
        """Store the q new entries of each row [B, q, *] at slots positions[b, i] ([B, q])."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]  # [B, 1]
        self.ckv[layer][rows, positions] = ckv.to(self.dtype)
        self.kpe[layer][rows, positions] = kpe.to(self.dtype)

    def write_layers(self, ckv: torch.Tensor, kpe: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """Every layer's q new entries at once: ckv, kpe [layers, B, q, *] at slots positions[b, i];
        rows is torch.arange(B)[:, None] on the buffers' device (made once by the caller)."""
        self.ckv_layers[:, rows, positions] = ckv.to(self.dtype)
        self.kpe_layers[:, rows, positions] = kpe.to(self.dtype)


def _round_up(n: int) -> int:
    return -(-n // GROWTH_CHUNK) * GROWTH_CHUNK
