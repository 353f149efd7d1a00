"""MTP speculative decoding: D chained MTP modules draft D tokens, one main-model call with q = D + 1 verifies them.

Per row, n tokens x_0 .. x_{n-1} are committed (prompt + generated); the main cache holds entries [0, n - 1)
and `drafts` guess tokens n .. n + D - 1. DeepSeek-V3's MTP is sequential: module d at slot t reads the
state at t (the main model's hidden h_t for d = 0, module d-1's output at t after) and token t + 1 + d,
and predicts token t + 2 + d. Drafting therefore chains: at slot n - 2, module 0 reads x_{n-1} and guesses
x_n; module 1 reads module 0's state there and that guess, and guesses x_{n+1}; and so on. One step:

    main:  decode([x_{n-1}, draft_0 .. draft_{D-1}] at positions n-1 .. n-1+D) -> g_0 .. g_D
    accept the longest prefix with draft_i == g_i (a drafts): commit g_0 .. g_a (a + 1 tokens)
    mtp:   each module d re-runs its slots from its first one that read a draft (max(0, n - 1 - d)) to the
           new n - 2, over committed tokens, and drafts at the new n - 2 (the chain above)

Each module keeps its own cache; an entry that read a draft is rewritten once the token is known (engines
may recompute a slot, see engine.py). Module d's input states are kept per slot (`_States`), so a module
can restart from any slot. Rows accept independently and drift apart in length; per-row positions carry
that. Tokens are chosen from the main model's logits exactly as plain decoding does, so greedy output is
identical to plain greedy (and sampled output follows the same distribution). A finished row is frozen:
its tokens are no longer emitted, and the slots it still writes lie past its end, where nothing reads them.
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
    depth: int = 1  # drafts per step
    drafted: int = 0  # drafts checked by the main model (active rows only): steps x depth
    accepted: int = 0
    tokens: int = 0  # tokens emitted, all rows
    row_calls: int = 0  # (row, main-model call) pairs while the row was active, prefill included
    main_calls: int = 0  # batched main-model calls, prefill included
    per_row_accepted: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)  # per depth d: row-steps whose drafts before d were accepted
    accepted_at: list[int] = field(default_factory=list)  # per depth d: row-steps that accepted draft d too

    def __post_init__(self) -> None:
        self.reached = self.reached or [0] * self.depth
        self.accepted_at = self.accepted_at or [0] * self.depth

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_per_depth(self) -> list[float]:
        """Per depth d: of the drafts at depth d whose earlier drafts were accepted, the share accepted."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_at, self.reached, strict=True)]

    @property
    def tokens_per_call(self) -> float:
        """Tokens per main-model call per row (plain decoding: 1.0)."""
        return self.tokens / self.row_calls if self.row_calls else 0.0

    def add(self, other: SpecStats) -> None:
        """Accumulate another run's counts (same depth)."""
        for key in ("drafted", "accepted", "tokens", "row_calls", "main_calls"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        self.reached = [a + b for a, b in zip(self.reached, other.reached, strict=True)]
        self.accepted_at = [a + b for a, b in zip(self.accepted_at, other.accepted_at, strict=True)]

    def to_dict(self) -> dict[str, object]:
        keys = ("depth", "drafted", "accepted", "acceptance_rate", "tokens", "main_calls", "tokens_per_call")
        out: dict[str, object] = {k: getattr(self, k) for k in keys}
        out["acceptance_per_depth"] = self.acceptance_per_depth
        out["reached_per_depth"], out["accepted_per_depth"] = list(self.reached), list(self.accepted_at)
        return out


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
    depth: int | None = None,
) -> tuple[list[list[int]], SpecStats]:
    """New token ids per prompt, as `generate` would give them, and the drafting statistics.

    `depth`: how many chained MTP modules draft per step (default: every module the engine has)."""
    c = engine.config
    check_prompts(prompts, c.vocab_size, c.max_position_embeddings, max_new_tokens)
    if engine.mtp_depth < 1:
        raise UserError("--mtp needs a model with an MTP module (num_nextn_predict_layers >= 1) and its graph")
    depth = engine.mtp_depth if depth is None else depth
    if not 1 <= depth <= engine.mtp_depth:
        raise UserError(f"--mtp-depth must be 1 to {engine.mtp_depth} (the model's MTP modules), got {depth}")
    rows = _Rows(len(prompts), max_new_tokens, stop_ids, on_token)
    stats = SpecStats(depth=depth, per_row_accepted=[0] * len(prompts))
    if max_new_tokens > 0:
        loop = _Speculation(engine, Sampler(sampling or SamplingConfig()), rows, stats)
        loop.prefill(prompts, max_new_tokens)
        while not rows.done.all():
            loop.step()
    stats.tokens = sum(len(o) for o in rows.out)
    return rows.out, stats


class _States:
    """Per-slot tensors [B, capacity, *] written and read at per-row positions [B, q] (grown on demand)."""

    def __init__(self, batch: int, capacity: int, width: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.data = torch.zeros(batch, capacity, *width, dtype=dtype, device=device)
        self.rows = torch.arange(batch, device=device)[:, None]

    def _reserve(self, positions: torch.Tensor) -> None:
        needed = int(positions.max()) + 1
        if needed > self.data.shape[1]:
            grown = self.data.new_zeros(self.data.shape[0], 2 * needed, *self.data.shape[2:])
            grown[:, : self.data.shape[1]] = self.data
            self.data = grown

    def write(self, positions: torch.Tensor, values: torch.Tensor) -> None:
        self._reserve(positions)
        self.data[self.rows, positions] = values.to(self.data.dtype)

    def read(self, positions: torch.Tensor) -> torch.Tensor:
        self._reserve(positions)
        return self.data[self.rows, positions]


class _Speculation:
    """Per-row state: n tokens committed, the last of them not yet fed to the main model, and D drafts."""

    def __init__(self, engine: Engine, sampler: Sampler, rows: _Rows, stats: SpecStats):
        self.engine, self.sampler, self.rows, self.stats = engine, sampler, rows, stats
        self.depth, self.device = stats.depth, engine.device
        self.index = torch.arange(len(rows.out), device=self.device)

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        ids, positions = pad_prompts(prompts, self.device)
        batch, seq = ids.shape
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        capacity = seq + max_new_tokens + 2 * self.depth + 2
        self.engine.start(batch, capacity)
        out = self.engine.prefill(ids, positions)
        first = self._choose(out.logits[self.index, lengths - 1])  # token L per row
        self._count()
        for row, token in enumerate(first.tolist()):
            self.rows.emit(row, token)
        # tokens: committed ones, then the drafts; states[d]: what module d reads at each slot
        self.tokens = _States(batch, capacity + self.depth, (), torch.long, self.device)
        self.tokens.write(positions, ids)
        self.tokens.write(lengths[:, None], first[:, None])
        width, dtype = (out.hidden.shape[-1],), out.hidden.dtype
        self.states = [_States(batch, capacity, width, dtype, self.device) for _ in range(self.depth)]
        self.states[0].write(positions, out.hidden)
        self.n = lengths + 1
        self.start = torch.zeros(self.depth, batch, dtype=torch.long, device=self.device)  # first slot to (re)run
        self.drafts = torch.zeros(batch, self.depth, dtype=torch.long, device=self.device)
        self._draft(torch.ones(batch, dtype=torch.bool, device=self.device))

    def step(self) -> None:
        active = torch.from_numpy(~self.rows.done).to(self.device)
        positions = (self.n - 1)[:, None] + torch.arange(self.depth + 1, device=self.device)  # [B, D + 1]
        last = self.tokens.read((self.n - 1)[:, None])
        verify = self.engine.decode(torch.cat([last, self.drafts], dim=1), positions)
        chosen = self._choose(verify.logits.flatten(0, 1)).view(positions.shape)  # g_0 .. g_D per row [B, D + 1]
        matched = torch.cumprod((chosen[:, :-1] == self.drafts).long(), dim=1)  # [B, D]: drafts 0..i all match
        accepted = torch.where(active, matched.sum(dim=1), 0)  # a per row
        self._count()
        self._record(active, accepted)
        for row, (tokens, a) in enumerate(zip(chosen.tolist(), accepted.tolist(), strict=True)):
            for token in tokens[: a + 1]:
                self.rows.emit(row, token)
        # g_0 .. g_a are x_n .. x_{n+a}; what lies past them is overwritten by the next drafts
        self.tokens.write(positions + 1, chosen)
        self.states[0].write(positions, verify.hidden)
        self.n = self.n + torch.where(active, accepted + 1, 0)
        self._draft(active)

    def _draft(self, active: torch.Tensor) -> None:
        """Each module d runs its slots start[d] .. n - 2 and drafts token n + d at slot n - 2."""
        end = self.n - 2
        for d in range(self.depth):
            offset = end - self.start[d]  # the drafting slot's index in this run
            positions = self.start[d][:, None] + torch.arange(int(offset.max()) + 1, device=self.device)
            next_ids = self.tokens.read(positions + 1 + d)  # module d at slot t reads token t + 1 + d
            out = self.engine.mtp(next_ids, self.states[d].read(positions), positions, depth=d)
            rows = self.index[active]
            self.drafts[rows, d] = out.logits[rows, offset[rows]].argmax(-1)  # a finished row is frozen
            self.tokens.write((self.n + d)[:, None], self.drafts[:, d : d + 1])
            if d + 1 < self.depth:
                self.states[d + 1].write(positions, out.hidden)
        # module d's entries stay valid where its token t + 1 + d is committed: t <= n - 2 - d
        self.start = (self.n[None] - 1 - torch.arange(self.depth, device=self.device)[:, None]).clamp(min=0)

    def _record(self, active: torch.Tensor, accepted: torch.Tensor) -> None:
        s = self.stats
        s.drafted += int(active.sum()) * self.depth
        s.accepted += int(accepted.sum())
        for d in range(self.depth):
            s.reached[d] += int((active & (accepted >= d)).sum())
            s.accepted_at[d] += int((active & (accepted > d)).sum())
        for row, a in enumerate(accepted.tolist()):
            s.per_row_accepted[row] += a

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The main model's choice [B], exactly as plain decoding makes it (same sampler)."""
        return torch.from_numpy(self.sampler(host(logits))).to(self.device)

    def _count(self) -> None:
        self.stats.main_calls += 1
        self.stats.row_calls += int((~self.rows.done).sum())
