"""Next-token choice from logits: greedy, or seeded sampling with temperature, top-k and top-p."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from dsv3c.errors import UserError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):  # NaN fails every comparison
            raise UserError(f"--temperature must be a number >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 means no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed < 0:  # numpy's generators take none
            raise UserError(f"--seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, V] -> token ids [B] (int64)."""
        if self.config.greedy:
            return logits.argmax(axis=-1).astype(np.int64)
        return np.array([self._sample_row(row) for row in logits], dtype=np.int64)

    def _sample_row(self, logits: np.ndarray) -> int:
        c = self.config
        scaled = logits.astype(np.float64) - logits.max()  # <= 0: a tiny temperature gives -inf, never inf - inf
        with np.errstate(over="ignore"):
            scaled /= c.temperature
        order = np.argsort(-scaled, kind="stable")  # best first
        if c.top_k:
            order = order[: c.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if c.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(probs), c.top_p) + 1)  # smallest prefix with mass >= p
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
