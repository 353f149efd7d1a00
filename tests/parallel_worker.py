"""One rank of an expert-parallel test run, started by tests/test_parallel_*.py as torchrun would start it.

python tests/parallel_worker.py SOURCE OUT.pt --ep N [--die-rank R] [--timeout S]   (env: RANK, WORLD_SIZE, ...)

Greedy-generates from fixed prompts and saves (tokens, per-step logits, collective stats) to OUT.pt;
--die-rank R makes rank R exit abruptly at its first MoE layer (a rank that dies mid-generation).
Errors are printed the way the CLI prints them: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]
STEPS = 6


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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--ep", type=int, required=True)
    p.add_argument("--die-rank", type=int, default=-1)
    p.add_argument("--timeout", type=float, default=20.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    from dsv3c.errors import UserError
    from dsv3c.parallel.session import open_expert_parallel
    from dsv3c.runtime.torch_backend import TorchEngine

    try:
        ep = open_expert_parallel(args.source, args.ep, timeout_s=args.timeout)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ep.group.rank == args.die_rank:
        for module in ep.model.modules():
            if getattr(module, "dispatch", None) is not None:
                module.dispatch = lambda *_: os._exit(3)
    try:
        tokens, logits = greedy(TorchEngine(ep.model))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ep.close()
    stats = ep.dispatch.stats
    torch.save(
        {"tokens": tokens, "logits": logits, "seconds": stats.seconds, "calls": stats.calls, "bytes": stats.bytes_sent},
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
