"""The generation loop, shared by every runtime: prefill a batch of prompts, then decode token by token.

A backend owns the latent cache; the loop only sees logits. Rows that hit a stop id keep decoding
(their tokens are discarded) so that the batch stays rectangular.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from dsv3c.runtime.sampling import Sampler, SamplingConfig

TokenCallback = Callable[[int, int], None]  # (row, token id), called as tokens arrive


class LogitsModel(Protocol):
    """What the loop drives: prompts in, logits at each row's last token out; it owns the latent cache."""

    vocab_size: int
    max_positions: int

    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int) -> np.ndarray:
        """Run the prompts (a cache for `capacity` tokens per row); logits at each last token [B, V]."""
        ...

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Append one token per row [B]; logits [B, V]."""
        ...


def generate(
    backend: LogitsModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_ids: Sequence[int] = (),
    on_token: TokenCallback | None = None,
) -> list[list[int]]:
    """New token ids per prompt (a stop id, when produced, is included and ends its row)."""
    from dsv3c.runtime.validate import check_prompts

    check_prompts(prompts, backend.vocab_size, backend.max_positions, max_new_tokens)
    sampler = Sampler(sampling or SamplingConfig())
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    if max_new_tokens == 0:
        return out
    capacity = max(len(p) for p in prompts) + max_new_tokens
    logits = backend.prefill(prompts, capacity)
    for step in range(max_new_tokens):
        tokens = sampler(logits)
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            out[row].append(token)
            if on_token is not None:
                on_token(row, token)
            done[row] = token in stop_ids
        if all(done) or step == max_new_tokens - 1:
            break
        logits = backend.decode(tokens)
    return out
