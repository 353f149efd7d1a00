"""Decode tokens/s, memory per rank and the MoE all-to-all time per step: expert parallelism vs one process.

    python bench/ep_decode.py --preset v2-lite --device cuda --out one.json                 # one GPU
    torchrun --nproc-per-node 2 bench/ep_decode.py --preset v2-lite --device cuda --ep 2 --out ep2.json
    torchrun --nproc-per-node 2 bench/ep_decode.py --preset tiny --ep 2                    # gloo on CPU

Random weights made on the device (each tensor seeded by its name, so every --ep runs the same model and
the script checks that they generate the same greedy tokens: pass --compare one.json). Per batch size:
prefill a random prompt of --context tokens, then time --steps greedy decode steps (CUDA synchronized).
Memory per rank is torch.cuda.max_memory_allocated (weights + cache + activations); on CPU it is the
weights alone. The all-to-all time is rank 0's time inside the MoE collectives during decode, waits for
slower peers included. Rank 0 prints and writes --out (command, commit, machine, device, rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import import_dsv3c

import_dsv3c()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dsv3c.models.config import DeepseekV3Config  # noqa: E402
from dsv3c.parallel.dispatch import install  # noqa: E402
from dsv3c.parallel.group import join, leave  # noqa: E402
from dsv3c.parallel.plan import ExpertPlan  # noqa: E402
from dsv3c.parallel.rank_model import random_rank_model  # noqa: E402
from dsv3c.runtime.engine import EngineBackend  # noqa: E402
from dsv3c.runtime.torch_backend import TorchEngine  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_batch(backend: EngineBackend, device: torch.device, batch: int, context: int, steps: int, dispatch: Any):
    prompts = torch.randint(2, backend.vocab_size, (batch, context), generator=torch.Generator().manual_seed(batch))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    logits = backend.prefill(prompts.tolist(), context + steps + 1)
    tokens = [logits.argmax(-1).tolist()]
    if dispatch is not None:
        dispatch.stats.reset()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        logits = backend.decode(logits.argmax(-1))
        tokens.append(logits.argmax(-1).tolist())
    _sync(device)
    seconds = time.perf_counter() - start
    row = {"batch": batch, "context": context, "steps": steps, "decode_tokens_per_s": batch * steps / seconds}
    row["ms_per_step"] = 1e3 * seconds / steps
    if dispatch is not None:
        row["all_to_all_ms_per_step"] = 1e3 * dispatch.stats.seconds / steps
        row["all_to_all_bytes_per_step"] = dispatch.stats.bytes_sent / steps
    if device.type == "cuda":
        row["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return row, tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="v2-lite")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (0: all)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--ep", type=int, default=0, help="ranks (run under torchrun); 0: one process, no dispatch")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--compare", type=Path, help="a one-process result file: check the greedy tokens are the same")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    config = DeepseekV3Config.from_preset(args.preset).replace(num_nextn_predict_layers=0)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    group = join(args.ep, args.device, args.timeout) if args.ep else None
    rank, ranks = (group.rank, group.world) if group else (0, 1)
    device = group.device if group else torch.device("cuda" if args.device == "cuda" else "cpu")
    plan = ExpertPlan.for_config(config, ranks)
    model = random_rank_model(config, plan, rank, device, dtype)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    dispatch = install(model, plan, group) if group else None
    backend = EngineBackend(TorchEngine(model))
    rows, tokens = [], {}
    for b in args.batches:
        row, tokens[str(b)] = run_batch(backend, device, b, args.context, args.steps, dispatch)
        row["weights_bytes_per_rank"] = weights
        rows.append(row)
    if group is not None:  # memory of every rank, to rank 0
        mine = torch.tensor([r.get("max_memory_allocated_bytes", weights) for r in rows], device=device)
        every = [torch.empty_like(mine) for _ in range(ranks)]
        dist.all_gather(every, mine)
        for i, row in enumerate(rows):
            row["memory_bytes_per_rank"] = [int(t[i]) for t in every]
        leave(barrier=True)
    if rank != 0:
        return 0
    result = _result(args, config, device, ranks, rows, tokens)
    print(f"{args.preset} ({config.num_hidden_layers} layers), {device.type}, {ranks} rank(s), {args.dtype}")
    for row in rows:
        a2a = f", all-to-all {row['all_to_all_ms_per_step']:.2f} ms/step" if "all_to_all_ms_per_step" in row else ""
        mem = max(row.get("memory_bytes_per_rank", [row.get("max_memory_allocated_bytes", weights)])) / 2**30
        print(
            f"  B={row['batch']:>3}: {row['decode_tokens_per_s']:.1f} tok/s, {row['ms_per_step']:.2f} ms/step{a2a}, "
            f"{mem:.2f} GiB max per rank"
        )
    if args.compare:
        same = json.loads(args.compare.read_text())["tokens"] == tokens
        result["same_tokens_as"] = {"file": str(args.compare), "same": same}
        print(f"greedy tokens {'identical to' if same else 'DIFFER from'} {args.compare}")
    if args.out:
        from dsv3c.artifact.atomic import write_text

        write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


def _result(
    args: argparse.Namespace,
    config: DeepseekV3Config,
    device: torch.device,
    ranks: int,
    rows: list[dict[str, Any]],
    tokens: dict[str, Any],
) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "python",
        "commit": commit.strip(),
        "machine": f"{platform.node()}, {os.cpu_count()} cores, {name}",
        "loadavg_1m": os.getloadavg()[0],
        "preset": args.preset,
        "layers": config.num_hidden_layers,
        "ranks": ranks,
        "backend": "nccl" if device.type == "cuda" and ranks > 1 else ("gloo" if ranks > 1 else "none"),
        "rows": rows,
        "tokens": tokens,
    }


if __name__ == "__main__":
    sys.exit(main())
