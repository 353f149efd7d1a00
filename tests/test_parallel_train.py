"""The same all-to-all dispatch trains: 2 gloo ranks give one process's losses and gradients."""

from __future__ import annotations

from pathlib import Path

import torch
from dsv3c.models.checkpoint import load_model
from dsv3c.parallel.plan import ExpertPlan, routed_expert

from .parallel_common import launch, one_thread  # noqa: F401 (autouse: one thread, as the ranks)
from .parallel_worker import CLIP, train_rank_main, train_steps, train_whole_rank_main


def test_two_ranks_train_like_one_process(tiny_checkpoint: Path, tmp_path: Path) -> None:
    losses, grads = train_steps(load_model(tiny_checkpoint))
    assert losses[-1] < losses[0]  # the steps really train
    results = launch(2, tiny_checkpoint, tmp_path, entry=train_rank_main)
    assert [r.exitcode for r in results] == [0, 0], [r.error for r in results]
    plan = ExpertPlan.contiguous(8, 2)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), atol=1e-5, rtol=0)
        mine = {n for n in grads if routed_expert(n) is None or routed_expert(n) in plan.experts[r]}
        assert set(got["grads"]) == mine  # its experts' gradients, and every replicated one
        for name in mine:
            torch.testing.assert_close(got["grads"][name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_sharded_training_gathers_back_to_the_single_process_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = load_model(tiny_checkpoint)
    losses, grads = train_steps(model, clip=lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP))
    assert (grads["norms"] > CLIP).all()  # the clip acted at every step
    results = launch(2, tiny_checkpoint, tmp_path, entry=train_whole_rank_main)
    assert [r.exitcode for r in results] == [0, 0], [r.error for r in results]
    primary = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert torch.load(tmp_path / "rank1.pt", weights_only=True)["state"] is None
    torch.testing.assert_close(torch.tensor(primary["losses"]), torch.tensor(losses), atol=1e-5, rtol=0)
    for r in range(2):  # the whole model's gradient norm, on every rank
        norms = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["norms"]
        torch.testing.assert_close(norms, grads["norms"], atol=1e-5, rtol=1e-5)
    expected = model.state_dict()
    assert set(primary["state"]) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(primary["state"][name], tensor, atol=1e-6, rtol=1e-5, msg=name)
