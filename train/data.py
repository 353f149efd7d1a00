"""Batches of token windows in a deterministic order: the batch of step s is a function of (seed, s).

A window holds seq_len + 1 + mtp_depth tokens: inputs, next-token targets, and the further targets the
MTP depths predict. Windows start every seq_len tokens; each epoch visits them in a permutation drawn
from (seed, epoch), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
from dsv3c.errors import UserError


class WindowBatches:
    def __init__(self, tokens: np.ndarray, seq_len: int, mtp_depth: int, batch_size: int, seed: int):
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.window = seq_len + 1 + mtp_depth
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.n_windows = (len(tokens) - self.window) // seq_len + 1
        if len(tokens) < self.window or self.n_windows < batch_size:
            raise UserError(
                f"{len(tokens)} tokens make {max(self.n_windows, 0)} windows of {self.window}; "
                f"need at least --batch-size {batch_size}: use more text or a smaller --seq-len/--batch-size"
            )
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.n_windows, generator=generator)
        return self._order

    def batch(self, step: int) -> torch.Tensor:
        """Token windows [batch_size, seq_len + 1 + mtp_depth] for training step `step` (0-based)."""
        per_epoch = self.n_windows // self.batch_size
        epoch, index = divmod(step, per_epoch)
        starts = self._permutation(epoch)[index * self.batch_size : (index + 1) * self.batch_size] * self.seq_len
        return torch.stack([self.tokens[s : s + self.window] for s in starts.tolist()])

    def fixed(self, n_batches: int) -> list[torch.Tensor]:
        """The first n_batches batches in file order (validation: the same windows every time)."""
        count = min(n_batches * self.batch_size, self.n_windows)
        starts = (torch.arange(count) * self.seq_len).tolist()
        windows = [self.tokens[s : s + self.window] for s in starts]
        return [torch.stack(windows[i : i + self.batch_size]) for i in range(0, count, self.batch_size)]
