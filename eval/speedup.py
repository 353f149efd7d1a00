"""MTP speculative decoding timed side by side with plain greedy decoding, on the same engine and prompts.

Per repeat, every prompt is decoded greedily and then speculatively, one after the other, so a change in
machine load touches both alike; the time of each is the fastest of the repeats (the least disturbed).
Speculative output must equal greedy output token for token; `identical` says whether it did.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from dsv3c.runtime.engine import Engine, EngineBackend
from dsv3c.runtime.generate import generate
from dsv3c.runtime.speculative import SpecStats, generate_mtp


@dataclass
class SpeedupRow:
    runtime: str
    prompts: int
    prompt_tokens: int
    new_tokens: int  # per prompt
    greedy_s: float
    mtp_s: float
    speedup: float  # greedy_s / mtp_s
    greedy_tokens_per_s: float
    mtp_tokens_per_s: float
    acceptance_rate: float
    tokens_per_call: float  # tokens per main-model call (greedy: 1.0)
    drafted: int
    accepted: int
    identical: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def measure_speedup(
    engine: Engine, runtime: str, prompts: Sequence[Sequence[int]], new_tokens: int, repeats: int = 3
) -> SpeedupRow:
    """Batch-1 decoding of every prompt, greedy vs MTP, the fastest of `repeats` runs of each."""
    greedy_best = mtp_best = float("inf")
    identical = True
    total = SpecStats()
    for repeat in range(repeats):
        greedy_s = mtp_s = 0.0
        for prompt in prompts:
            start = time.perf_counter()
            plain = generate(EngineBackend(engine), [prompt], new_tokens)
            greedy_s += time.perf_counter() - start
            start = time.perf_counter()
            drafted, stats = generate_mtp(engine, [prompt], new_tokens)
            mtp_s += time.perf_counter() - start
            identical &= drafted == plain
            if repeat == 0:
                for key in ("drafted", "accepted", "tokens", "row_calls", "main_calls"):
                    setattr(total, key, getattr(total, key) + getattr(stats, key))
        greedy_best, mtp_best = min(greedy_best, greedy_s), min(mtp_best, mtp_s)
    tokens = len(prompts) * new_tokens
    return SpeedupRow(
        runtime=runtime,
        prompts=len(prompts),
        prompt_tokens=len(prompts[0]),
        new_tokens=new_tokens,
        greedy_s=greedy_best,
        mtp_s=mtp_best,
        speedup=greedy_best / mtp_best,
        greedy_tokens_per_s=tokens / greedy_best,
        mtp_tokens_per_s=tokens / mtp_best,
        acceptance_rate=total.acceptance_rate,
        tokens_per_call=total.tokens_per_call,
        drafted=total.drafted,
        accepted=total.accepted,
        identical=identical,
    )


def text_prompts(ids: Sequence[int], count: int, length: int, spacing: int) -> list[list[int]]:
    """`count` prompts of `length` tokens, starting every `spacing` tokens of the stream."""
    prompts = [list(ids[i : i + length]) for i in range(0, len(ids) - length + 1, spacing)][:count]
    return prompts
