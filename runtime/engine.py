"""An engine runs the exported graph roles over its own latent caches; `EngineBackend` turns one into a LogitsModel.

Every engine follows the export's append rule: row b's past holds valid entries [0, positions[b, 0]); the
new entry i of row b is written at slot positions[b, i]. An engine keeps no lengths of its own, so a
caller may give each row its own positions (rows of a batch at different lengths, speculative steps that
accept a different number of tokens per row) and may recompute a slot by running it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from dsv3c.models.config import DeepseekV3Config


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, q, vocab] on the engine's device
    hidden: torch.Tensor  # [B, q, hidden]: final-normed (main model); an MTP module's state (what the next reads)


class Engine(Protocol):
    config: DeepseekV3Config
    device: torch.device
    mtp_depth: int  # MTP modules it can run (0: none); module d drafts the token d + 1 past the next one

    def start(self, batch: int, capacity: int) -> None:
        """Fresh caches for `batch` rows of `capacity` slots (they grow by chunks if a step needs more)."""
        ...

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> StepOutput:
        """ids, positions [B, S] from position 0, no past; writes S entries per row."""
        ...

    def decode(self, ids: torch.Tensor, positions: torch.Tensor) -> StepOutput:
        """ids, positions [B, q] over the past; writes q entries per row."""
        ...

    def mtp(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, depth: int = 0) -> StepOutput:
        """MTP module `depth` over its own cache: at slot t, token t+1+depth and the state at t (the main model's
        final-normed hidden for depth 0, module depth-1's output after) -> logits for token t+2+depth."""
        ...

    def cache_bytes_per_token(self) -> int:
        """Latent cache bytes one token adds to one row (main model only)."""
        ...


def pad_prompts(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, S] (padding 0, never attended by real tokens) and positions [B, S]."""
    seq = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), seq, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    positions = torch.arange(seq, dtype=torch.long).expand(len(prompts), seq).contiguous()
    return ids.to(device), positions.to(device)


def host(logits: torch.Tensor) -> np.ndarray:
    return logits.float().cpu().numpy()


class EngineBackend:
    """The generation loop's LogitsModel over an engine: one new token per row per decode call."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.vocab_size = engine.config.vocab_size
        self.max_positions = engine.config.max_position_embeddings
        self.lengths = torch.zeros(0, dtype=torch.long)

    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int) -> np.ndarray:
        device = self.engine.device
        ids, positions = pad_prompts(prompts, device)
        self.engine.start(len(prompts), capacity)
        out = self.engine.prefill(ids, positions)
        self.lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
        rows = torch.arange(len(prompts), device=device)
        return host(out.logits[rows, self.lengths - 1])  # [B, V]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(self.engine.device)[:, None]
        out = self.engine.decode(ids, self.lengths[:, None])  # [B, 1] at each row's own position
        self.lengths = self.lengths + 1
        return host(out.logits[:, -1])
