"""MTP speculative decoding timed side by side with plain greedy decoding, on the same engine and prompts.

Per repeat, every prompt is decoded greedily and then speculatively at each drafting depth (1 .. the
model's MTP modules), one after the other, so a change in machine load touches all of them alike; the time
of each is the fastest of the repeats (the least disturbed). Speculative output must equal greedy output
token for token; `identical` says whether it did.
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
    depth: int  # drafts per step (chained MTP modules)
    prompts: int
    prompt_tokens: int
    new_tokens: int  # per prompt
    greedy_s: float
    mtp_s: float
    speedup: float  # greedy_s / mtp_s
    greedy_tokens_per_s: float
    mtp_tokens_per_s: float
    acceptance_rate: float  # accepted / drafted, all depths
    acceptance_per_depth: list[float]  # depth d: accepted share of the drafts whose earlier drafts were accepted
    tokens_per_call: float  # tokens per main-model call (greedy: 1.0)
    drafted: int
    accepted: int
    identical: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def measure_speedup(
    engine: Engine,
    runtime: str,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    repeats: int = 3,
    depths: Sequence[int] | None = None,
) -> list[SpeedupRow]:
    """Batch-1 decoding of every prompt, greedy vs MTP at each depth in `depths` (default: 1 .. all the
    engine's MTP modules), the fastest of `repeats` runs of each; one row per depth."""
    depths = list(depths or range(1, engine.mtp_depth + 1))
    greedy_best, mtp_best = float("inf"), dict.fromkeys(depths, float("inf"))
    identical = dict.fromkeys(depths, True)
    totals = {d: SpecStats(depth=d) for d in depths}
    for repeat in range(repeats):
        greedy_s, mtp_s = 0.0, dict.fromkeys(depths, 0.0)
        for prompt in prompts:
            start = time.perf_counter()
            plain = generate(EngineBackend(engine), [prompt], new_tokens)
            greedy_s += time.perf_counter() - start
            for depth in depths:
                start = time.perf_counter()
                drafted, stats = generate_mtp(engine, [prompt], new_tokens, depth=depth)
                mtp_s[depth] += time.perf_counter() - start
                identical[depth] &= drafted == plain
                if repeat == 0:
                    totals[depth].add(stats)
        greedy_best = min(greedy_best, greedy_s)
        mtp_best = {d: min(mtp_best[d], mtp_s[d]) for d in depths}
    tokens = len(prompts) * new_tokens
    return [
        SpeedupRow(
            runtime=runtime,
            depth=depth,
            prompts=len(prompts),
            prompt_tokens=len(prompts[0]),
            new_tokens=new_tokens,
            greedy_s=greedy_best,
            mtp_s=mtp_best[depth],
            speedup=greedy_best / mtp_best[depth],
            greedy_tokens_per_s=tokens / greedy_best,
            mtp_tokens_per_s=tokens / mtp_best[depth],
            acceptance_rate=totals[depth].acceptance_rate,
            acceptance_per_depth=totals[depth].acceptance_per_depth,
            tokens_per_call=totals[depth].tokens_per_call,
            drafted=totals[depth].drafted,
            accepted=totals[depth].accepted,
            identical=identical[depth],
        )
        for depth in depths
    ]


def text_prompts(ids: Sequence[int], count: int, length: int, spacing: int) -> list[list[int]]:
    """`count` prompts of `length` tokens, starting every `spacing` tokens of the stream."""
    prompts = [list(ids[i : i + length]) for i in range(0, len(ids) - length + 1, spacing)][:count]
    return prompts
