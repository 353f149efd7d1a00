"""One rank of an expert-parallel test run, as torchrun would start it (RANK, WORLD_SIZE, MASTER_* in env).

`rank_main` greedy-generates from fixed prompts and saves (tokens, per-step logits, collective stats) to
OUT/rank{r}.pt; an error is written, as the CLI would print it (one line), to OUT/rank{r}.err and the
rank exits 2. Faults for the failure tests: `die_rank` exits abruptly at its first MoE layer (a rank that
dies mid-generation), `hang_rank` stops answering there (alive, but stuck).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]
STEPS = 6
CLIP = 0.5  # below the tiny model's gradient norm, so clipping acts


def greedy(engine, prompts=PROMPTS, steps=STEPS) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens per row and the logits [B, V] that chose each step's token."""
    from dsv3c.runtime.engine import EngineBackend

    backend = EngineBackend(engine)
    logits = torch.from_numpy(backend.prefill(prompts, max(map(len, prompts)) + steps))
    tokens: list[list[int]] = [[] for _ in prompts]
    history = []
    for step in range(steps):
        history.append(logits)
        chosen = logits.argmax(-1)
        for row, t in enumerate(chosen.tolist()):
            tokens[row].append(t)
        if step < steps - 1:
            logits = torch.from_numpy(backend.decode(chosen.numpy()))
    return tokens, history


def rank_main(
    source: Path,
    out: Path,
    ep: int,
    die_rank: int = -1,
    hang_rank: int = -1,
    timeout_s: float = 20.0,
    dtype: torch.dtype = torch.float32,
) -> int:
    from dsv3c.errors import UserError
    from dsv3c.parallel.group import leave
    from dsv3c.parallel.session import open_expert_parallel
    from dsv3c.runtime.torch_backend import TorchEngine

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    try:
        ep = open_expert_parallel(source, ep, dtype=dtype, timeout_s=timeout_s)
        fault = {die_rank: lambda *_: os._exit(3), hang_rank: lambda *_: time.sleep(600)}.get(rank)
        if fault is not None:
            for module in ep.model.modules():
                if getattr(module, "dispatch", None) is not None:
                    module.dispatch = fault
        try:
            tokens, logits = greedy(TorchEngine(ep.model))
        except BaseException:
            leave()
            raise
        ep.close()
    except UserError as e:
        (out / f"rank{rank}.err").write_text(f"{e}\n")
        return 2
    s = ep.dispatch.stats
    result = {"tokens": tokens, "logits": logits, "seconds": s.seconds, "calls": s.calls, "bytes": s.bytes_sent}
    torch.save(result, out / f"rank{rank}.pt")
    return 0


def train_steps(model, steps: int = 3, lr: float = 0.05, clip=None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """SGD on a fixed batch: the loss before each step, and the first step's gradients by parameter name.

    `clip(model)`, when given, clips the gradients before each step (and its norms are returned in "norms").
    """
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, grads = [], {}
    for step in range(steps):
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if clip is not None:
            grads.setdefault("norms", torch.zeros(steps))[step] = clip(model)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, grads


def train_rank_main(source: Path, out: Path, ep: int, timeout_s: float = 20.0) -> int:
    """Like rank_main, but a few training steps through the all-to-all dispatch (gradients included)."""
    from dsv3c.errors import UserError
    from dsv3c.parallel.session import open_expert_parallel

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    try:
        ep_rank = open_expert_parallel(source, ep, timeout_s=timeout_s)
        losses, grads = train_steps(ep_rank.model)
        ep_rank.close()
    except UserError as e:
        (out / f"rank{rank}.err").write_text(f"{e}\n")
        return 2
    torch.save({"losses": losses, "grads": grads}, out / f"rank{rank}.pt")
    return 0


def train_whole_rank_main(source: Path, out: Path, ep: int, timeout_s: float = 20.0) -> int:
    """Training's path: the whole model built on every rank, sharded, trained, gathered back to rank 0."""
    from dsv3c.errors import UserError
    from dsv3c.models.checkpoint import load_model
    from dsv3c.parallel.group import join, leave
    from dsv3c.parallel.plan import ExpertPlan
    from dsv3c.parallel.training import clip_grad_norm_, gather_state, shard

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    try:
        group = join(ep, "cpu", timeout_s)
        try:
            model = load_model(source)
            shapes = {n: t.shape for n, t in model.state_dict().items()}
            plan = ExpertPlan.for_config(model.config, ep)
            shard(model, plan, group)
            losses, grads = train_steps(model, clip=lambda m: clip_grad_norm_(m, CLIP, group))
            state = gather_state(model, plan, group, shapes)
        except BaseException:
            leave()
            raise
        leave(barrier=True)
    except UserError as e:
        (out / f"rank{rank}.err").write_text(f"{e}\n")
        return 2
    torch.save({"losses": losses, "state": state, "norms": grads["norms"]}, out / f"rank{rank}.pt")
    return 0


def cli_rank_main(source: Path, out: Path, ep: int, argv: list[str]) -> int:
    """`dsv3c ARGV` as one rank of a torchrun launch (torchrun's environment is already set)."""
    from dsv3c.cli.main import main

    torch.set_num_threads(1)
    return main(argv)


def mtp_rank_main(source: Path, out: Path, ep: int, timeout_s: float = 20.0) -> int:
    """Speculative decoding with the MTP module (its MoE dispatched too): ids and stats to OUT/rank{r}.pt."""
    from dsv3c.parallel.session import open_expert_parallel
    from dsv3c.runtime.speculative import generate_mtp
    from dsv3c.runtime.torch_backend import TorchEngine

    torch.set_num_threads(1)
    ep_rank = open_expert_parallel(source, ep, timeout_s=timeout_s)
    ids, stats = generate_mtp(TorchEngine(ep_rank.model), PROMPTS, 10)
    ep_rank.close()
    torch.save({"ids": ids, "stats": stats.to_dict()}, out / f"rank{ep_rank.group.rank}.pt")
    return 0
