"""Expert-parallel generation on gloo: 2 and 4 rank processes give the single-process tokens and logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dsv3c.models.checkpoint import load_model
from dsv3c.parallel.partition import partition_checkpoint
from dsv3c.runtime.torch_backend import TorchEngine

from .parallel_common import launch, one_thread  # noqa: F401 (autouse: one thread, as the ranks)
from .parallel_worker import PROMPTS, greedy, mtp_rank_main


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> tuple[list[list[int]], list[torch.Tensor]]:
    return greedy(TorchEngine(load_model(tiny_checkpoint)))


def _check_ranks(out: Path, world: int, reference: tuple[list[list[int]], list[torch.Tensor]]) -> None:
    tokens, logits = reference
    assert len({tuple(map(tuple, tokens))}) == 1
    for r in range(world):
        got = torch.load(out / f"rank{r}.pt", weights_only=True)
        assert got["tokens"] == tokens, f"rank {r}"
        assert len(got["logits"]) == len(logits)
        for step, (a, b) in enumerate(zip(got["logits"], logits, strict=True)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m, s=step, r=r: f"rank {r} step {s}: {m}")
        # prefill + 5 decode steps, 2 MoE layers, 5 collectives each: the experts really were remote
        assert got["calls"] == 6 * 2 * 5 and got["bytes"] > 0 and got["seconds"] > 0


def test_two_ranks_from_a_partition_folder(tiny_checkpoint: Path, tmp_path: Path, reference) -> None:
    part = tmp_path / "part2"
    partition_checkpoint(tiny_checkpoint, 2, part)
    results = launch(2, part, tmp_path)
    assert [r.exitcode for r in results] == [0, 0], [r.error for r in results]
    _check_ranks(tmp_path, 2, reference)


def test_four_ranks_straight_from_the_checkpoint(tiny_checkpoint: Path, tmp_path: Path, reference) -> None:
    results = launch(4, tiny_checkpoint, tmp_path)
    assert [r.exitcode for r in results] == [0] * 4, [r.error for r in results]
    _check_ranks(tmp_path, 4, reference)


def test_two_ranks_in_bf16(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Activations travel as bf16 and are converted where one process converts them: still the same numbers."""
    reference = greedy(TorchEngine(load_model(tiny_checkpoint, dtype=torch.bfloat16)))
    results = launch(2, tiny_checkpoint, tmp_path, dtype=torch.bfloat16)
    assert [r.exitcode for r in results] == [0, 0], [r.error for r in results]
    _check_ranks(tmp_path, 2, reference)


def test_two_ranks_with_mtp_speculative_decoding(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The MTP module's MoE goes through the dispatch too; drafts and acceptances are those of one process."""
    from dsv3c.runtime.speculative import generate_mtp

    ids, stats = generate_mtp(TorchEngine(load_model(tiny_checkpoint)), PROMPTS, 10)
    results = launch(2, tiny_checkpoint, tmp_path, entry=mtp_rank_main)
    assert [r.exitcode for r in results] == [0, 0], [r.error for r in results]
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["ids"] == ids and got["stats"] == stats.to_dict()
