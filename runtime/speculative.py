"""MTP speculative decoding: the MTP module drafts one token, one main-model call with q = 2 verifies it.

Per row, n tokens are committed (prompt + generated); the main cache holds entries [0, n - 1), the MTP
cache entries [0, n - 1) too (MTP slot t reads main hidden h_t and token t + 1), and `draft` guesses
token n. One step:

    main:  decode([x_{n-1}, draft] at positions [n-1, n])  -> g1 (token n), g2 (token n+1 if draft == g1)
    accept when g1 == draft: commit g1, g2 (2 tokens); else commit g1 (the slot-n entry is left invalid)
    mtp:   mtp([g1, g2], [h_{n-1}, h_n] at positions [n-1, n]) -> the next draft, read at slot 1 or 0

Rows accept independently and drift apart in length; the per-row positions carry that. Tokens are chosen
from the main model's logits exactly as plain decoding does, so greedy output is identical to plain greedy
(and sampled output follows the same distribution). A finished row is frozen: its tokens are no longer
emitted, and the slots it still writes lie past its end, where nothing reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from dsv3c.errors import UserError
from dsv3c.runtime.engine import Engine, host, pad_prompts
from dsv3c.runtime.generate import TokenCallback
from dsv3c.runtime.sampling import Sampler, SamplingConfig
from dsv3c.runtime.validate import check_prompts


@dataclass
class SpecStats:
    drafted: int = 0  # drafts checked by the main model (active rows only)
    accepted: int = 0
    tokens: int = 0  # tokens emitted, all rows
    row_calls: int = 0  # (row, main-model call) pairs while the row was active, prefill included
    main_calls: int = 0  # batched main-model calls, prefill included
    per_row_accepted: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_call(self) -> float:
        """Tokens per main-model call per row (plain decoding: 1.0)."""
        return self.tokens / self.row_calls if self.row_calls else 0.0

    def to_dict(self) -> dict[str, float | int]:
        keys = ("drafted", "accepted", "acceptance_rate", "tokens", "main_calls", "tokens_per_call")
        return {k: getattr(self, k) for k in keys}


class _Rows:
    """Per-row output, stop and length bookkeeping."""

    def __init__(self, batch: int, max_new: int, stop_ids: Sequence[int], on_token: TokenCallback | None):
        self.out: list[list[int]] = [[] for _ in range(batch)]
        self.done = np.zeros(batch, dtype=bool)
        self.max_new, self.stop_ids, self.on_token = max_new, set(stop_ids), on_token

    def emit(self, row: int, token: int) -> None:
        if self.done[row]:
            return
        self.out[row].append(token)
        if self.on_token is not None:
            self.on_token(row, token)
        self.done[row] = token in self.stop_ids or len(self.out[row]) >= self.max_new


def generate_mtp(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_ids: Sequence[int] = (),
    on_token: TokenCallback | None = None,
) -> tuple[list[list[int]], SpecStats]:
    """New token ids per prompt, as `generate` would give them, and the drafting statistics."""
    c = engine.config
    check_prompts(prompts, c.vocab_size, c.max_position_embeddings, max_new_tokens)
    if not engine.has_mtp:
        raise UserError("--mtp needs a model with an MTP module (num_nextn_predict_layers >= 1) and its graph")
    rows = _Rows(len(prompts), max_new_tokens, stop_ids, on_token)
    stats = SpecStats(per_row_accepted=[0] * len(prompts))
    if max_new_tokens > 0:
        loop = _Speculation(engine, Sampler(sampling or SamplingConfig()), rows, stats)
        loop.prefill(prompts, max_new_tokens)
        while not rows.done.all():
            loop.step()
    stats.tokens = sum(len(o) for o in rows.out)
    return rows.out, stats


class _Speculation:
    """Per-row state: n tokens committed, the last of them not yet fed to the main model, and a draft."""

    def __init__(self, engine: Engine, sampler: Sampler, rows: _Rows, stats: SpecStats):
        self.engine, self.sampler, self.rows, self.stats = engine, sampler, rows, stats
        self.device = engine.device
        self.index = torch.arange(len(rows.out), device=self.device)

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        ids, positions = pad_prompts(prompts, self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        self.engine.start(len(prompts), ids.shape[1] + max_new_tokens + 2)
        out = self.engine.prefill(ids, positions)
        first = self._choose(out.logits[self.index, lengths - 1])  # token L per row
        self._count()
        for row, token in enumerate(first.tolist()):
            self.rows.emit(row, token)
        next_ids = torch.roll(ids, -1, dims=1)  # MTP slot t reads token t + 1
        next_ids[self.index, lengths - 1] = first
        drafts = self.engine.mtp(next_ids, out.hidden, positions).logits[self.index, lengths - 1]
        self.draft = drafts.argmax(-1)  # guesses token L + 1
        self.n, self.last = lengths + 1, first

    def step(self) -> None:
        active = torch.from_numpy(~self.rows.done).to(self.device)
        positions = torch.stack([self.n - 1, self.n], dim=1)  # [B, 2]
        verify = self.engine.decode(torch.stack([self.last, self.draft], dim=1), positions)
        g1, g2 = self._choose(verify.logits[:, 0]), self._choose(verify.logits[:, 1])
        accepted = (g1 == self.draft) & active
        self._count()
        self.stats.drafted += int(active.sum())
        self.stats.accepted += int(accepted.sum())
        for row, (a, b, ok) in enumerate(zip(g1.tolist(), g2.tolist(), accepted.tolist(), strict=True)):
            self.stats.per_row_accepted[row] += int(ok)
            self.rows.emit(row, a)
            if ok:
                self.rows.emit(row, b)
        mtp_ids = torch.stack([g1, torch.where(accepted, g2, g1)], dim=1)
        drafts = self.engine.mtp(mtp_ids, verify.hidden, positions).logits[self.index, accepted.long()]
        self.draft = torch.where(active, drafts.argmax(-1), self.draft)  # a finished row is frozen
        self.last = torch.where(active, torch.where(accepted, g2, g1), self.last)
        self.n = self.n + active.long() + accepted.long()

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The main model's choice [B], exactly as plain decoding makes it (same sampler)."""
        return torch.from_numpy(self.sampler(host(logits))).to(self.device)

    def _count(self) -> None:
        self.stats.main_calls += 1
        self.stats.row_calls += int((~self.rows.done).sum())
