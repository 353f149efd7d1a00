"""Checks on user prompts, shared by every runtime."""

from __future__ import annotations

from collections.abc import Sequence

from dsv3c.errors import UserError


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_positions: int, max_new: int) -> None:
    if not prompts:
        raise UserError("no prompt given; pass --prompt-ids 1,2,3 (repeat it for a batch)")
    if max_new < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {max_new}")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise UserError(f"prompt {i + 1} is empty; give at least one token id")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"prompt {i + 1}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        if len(prompt) + max_new > max_positions:
            raise UserError(
                f"prompt {i + 1}: {len(prompt)} tokens + {max_new} new exceed the model's maximum context "
                f"of {max_positions} positions; shorten the prompt or lower --max-new-tokens"
            )
