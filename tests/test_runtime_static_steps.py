"""The benchmarks' side-by-side static decode timing: every folder timed alike, its logits kept."""

from __future__ import annotations

from pathlib import Path

import torch
from dsv3c.runtime.bench.static_steps import interleaved_step_ms
from dsv3c.runtime.latent_buffers import GROWTH_CHUNK


def test_folders_take_turns_and_report_the_allocated_capacity(tiny_export: Path) -> None:
    timed = interleaved_step_ms({"a": tiny_export, "b": tiny_export}, 12, steps=2, rounds=3, threads=1)
    assert timed.capacity == GROWTH_CHUNK  # 12 slots asked, one growth chunk allocated
    assert {k: len(v) for k, v in timed.ms.items()} == {"a": 6, "b": 6}
    assert all(ms > 0 for v in timed.ms.values() for ms in v)
    assert torch.equal(timed.logits["a"], timed.logits["b"])  # the same graph, the same step
    assert torch.isfinite(timed.logits["a"]).all()
