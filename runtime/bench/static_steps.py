"""Static-shape decode steps of several ort folders timed side by side (runtime/ort_cuda_graph.StaticDecoder).

A static step attends over the whole fixed-capacity cache (the mask hides the empty slots), so its cost is
the cost at context = capacity whatever the position. The folders take turns, `steps` steps each per round,
so that a change in a shared machine's load falls on all alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from dsv3c.runtime.ort_cuda_graph import StaticDecoder


@dataclass
class StepTimes:
    ms: dict[str, list[float]]  # folder name -> ms of each timed step
    logits: dict[str, torch.Tensor]  # folder name -> logits of its first timed step (on the CPU)
    capacity: int  # the cache's capacity as allocated (the asked one rounded up to whole growth chunks)


def interleaved_step_ms(
    folders: dict[str, Path], capacity: int, steps: int, rounds: int, device: str = "cpu", threads: int = 2
) -> StepTimes:
    """ms per decode step of each folder (batch 1; on CUDA replayed as a CUDA graph and synchronized after
    each step), and each folder's logits at the first timed step."""
    cuda = device == "cuda"
    decoders = {
        name: StaticDecoder(folder, 1, capacity, device=device, cuda_graph=cuda, threads=threads)
        for name, folder in folders.items()
    }
    ids = torch.tensor([[7]], device=device)
    capacity = next(iter(decoders.values())).capacity
    first = max(0, capacity - steps - 2)  # the last slots: the step attends over a full cache
    positions = [torch.tensor([[first + p]], device=device) for p in range(2 + steps)]
    times: dict[str, list[float]] = {name: [] for name in folders}
    logits: dict[str, torch.Tensor] = {}

    def step(decoder: StaticDecoder, position: int) -> torch.Tensor:
        out = decoder.step(ids, positions[position])
        if cuda:
            torch.cuda.synchronize()
        return out

    for decoder in decoders.values():  # warm-up: onnxruntime allocates its arenas (and captures) first
        for position in range(2):
            step(decoder, position)
    for _ in range(rounds):
        for name, decoder in decoders.items():
            for position in range(2, 2 + steps):
                start = time.perf_counter()
                out = step(decoder, position)
                times[name].append(1e3 * (time.perf_counter() - start))
                if name not in logits:
                    logits[name] = out.float().cpu().clone()
    return StepTimes(times, logits, capacity)
