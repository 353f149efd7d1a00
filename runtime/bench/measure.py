"""Prefill and decode throughput of onnxruntime, our PyTorch model and transformers, side by side in one run.

For every runtime (loaded one at a time, so that only one copy of the weights is in memory), batch and
context: prefill random prompts of `context` tokens (timed: prefill tokens/s), take one untimed decode step,
then time `decode_steps` steps (decode tokens/s at that context). Each row also reports the bytes a call
must read (weights it touches, plus the latent or K/V cache in decode) and the rate achieved against the
measured memory bandwidth: decode on a CPU is bound by memory bandwidth, so that fraction says how close a
runtime comes to the floor.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from dsv3c import progress as dsv3c_progress
from dsv3c.errors import UserError
from dsv3c.runtime.bench.runners import Runner

RuntimeName = Literal["ort", "torch", "transformers"]
Phase = Literal["prefill", "decode"]
RUNTIMES: tuple[RuntimeName, ...] = ("ort", "torch", "transformers")


@dataclass
class BenchRow:
    runtime: str
    phase: Phase
    context: int
    batch: int
    tokens_per_s: float
    cache_bytes_per_token: int
    ms_per_call: float  # prefill: the whole prompt; decode: one step, one token per row (median of steps)
    bytes_per_call: int  # weights the call reads, plus the cache it attends over (decode)
    achieved_bytes_per_s: float
    bandwidth_fraction: float  # achieved / measured copy bandwidth
    device: str = "cpu"
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "extra"}, **d["extra"]}


@dataclass(frozen=True)
class BenchPlan:
    contexts: Sequence[int] = (128, 1024, 4096)
    batches: Sequence[int] = (1, 8)
    runtimes: Sequence[RuntimeName] = RUNTIMES
    decode_steps: int = 8
    prefill_chunk: int = 1024
    seed: int = 0
    model: str = ""
    device: str = "cpu"
    one_at_a_time: bool = False


Progress = Callable[[str], None]


def run_bench(
    plan: BenchPlan, factories: dict[str, Callable[[], Runner]], bandwidth: float, progress: Progress = print
) -> list[BenchRow]:
    """Every runtime is loaded first, then each (batch, context) cell is measured on all of them in turn,
    so that a change in machine load over the run touches every runtime alike (`one_at_a_time` loads one
    runtime at a time instead, for weights that do not fit in memory more than once)."""
    rows: list[BenchRow] = []
    names: list[str] = [n for n in plan.runtimes if n in factories]
    groups = [[n] for n in names] if plan.one_at_a_time else [names]
    cells = len(names) * len(plan.batches) * len(plan.contexts)
    with dsv3c_progress.task("benchmark cells (runtime x batch x context)", total=cells) as bar:
        for group in groups:
            _run_group(plan, group, factories, bandwidth, progress, rows, bar)
    return sorted(rows, key=lambda r: (names.index(r.runtime), r.batch, r.context, r.phase != "prefill"))


def _run_group(
    plan: BenchPlan,
    group: list[str],
    factories: dict[str, Callable[[], Runner]],
    bandwidth: float,
    progress: Progress,
    rows: list[BenchRow],
    bar: dsv3c_progress.Task,
) -> None:
    """Load the runtimes of `group`, then measure every (batch, context) cell on each (rows appended)."""
    runners: dict[str, Runner] = {}
    for name in group:
        progress(f"loading {name}")
        try:
            runners[name] = factories[name]()
            _warm_up(runners[name], plan)
        except (UserError, RuntimeError, ImportError, MemoryError) as e:
            progress(f"{name}: skipped ({_first_line(e)})")
            runners.pop(name, None)
    for batch in plan.batches:
        for context in plan.contexts:
            for name, runner in runners.items():
                bar.update(description=f"{name}: batch {batch}, context {context}")
                try:
                    cell = measure(runner, plan, batch, context, bandwidth)
                except (RuntimeError, MemoryError) as e:  # onnxruntime's errors derive from RuntimeError
                    progress(f"{name} batch {batch} context {context}: skipped ({_first_line(e)})")
                    bar.advance()
                    continue
                rows += cell
                bar.advance()
                progress(
                    "  ".join(
                        f"{r.runtime} {r.phase} ctx {r.context} b {r.batch}: {r.tokens_per_s:.1f} tok/s" for r in cell
                    )
                )
    del runners
    gc.collect()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _warm_up(runner: Runner, plan: BenchPlan) -> None:
    ids = _ids(runner, plan, 1, 8)
    runner.prefill(ids, plan.prefill_chunk, 4)
    runner.decode(ids[:, :1])


def _ids(runner: Runner, plan: BenchPlan, batch: int, seq: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(plan.seed + 1000 * batch + seq)
    return torch.randint(0, runner.config.vocab_size, (batch, seq), generator=generator)


def measure(runner: Runner, plan: BenchPlan, batch: int, context: int, bandwidth: float) -> list[BenchRow]:
    ids = _ids(runner, plan, batch, context + plan.decode_steps + 1)
    _sync(plan.device)
    start = time.perf_counter()
    runner.prefill(ids[:, :context], plan.prefill_chunk, plan.decode_steps + 2)
    _sync(plan.device)
    prefill_s = time.perf_counter() - start
    runner.decode(ids[:, context : context + 1])  # untimed: first-call allocations at this size
    steps = []
    for i in range(plan.decode_steps):
        _sync(plan.device)
        start = time.perf_counter()
        runner.decode(ids[:, context + 1 + i : context + 2 + i])
        _sync(plan.device)
        steps.append(time.perf_counter() - start)
    step_s = statistics.median(steps)  # robust to a step that another process on the machine delayed
    cache = runner.cache_bytes_per_token()
    chunks = -(-context // plan.prefill_chunk)
    prefill_bytes = chunks * runner.step_weight_bytes(batch * min(context, plan.prefill_chunk))
    mean_context = context + 1 + plan.decode_steps // 2
    decode_bytes = runner.step_weight_bytes(batch) + batch * mean_context * cache
    extra = {
        "decode_steps": plan.decode_steps,
        "prefill_chunk": plan.prefill_chunk,
        "bandwidth_bytes_per_s": bandwidth,
        "loadavg_1m": os.getloadavg()[0],
    }

    def row(phase: Phase, tokens: int, seconds: float, nbytes: int) -> BenchRow:
        achieved = nbytes / seconds
        return BenchRow(
            runner.name,
            phase,
            context,
            batch,
            tokens / seconds,
            cache,
            seconds * 1e3,
            nbytes,
            achieved,
            achieved / bandwidth,
            plan.device,
            plan.model,
            dict(extra),
        )

    return [row("prefill", batch * context, prefill_s, prefill_bytes), row("decode", batch, step_s, decode_bytes)]
