"""Where a training step's time goes, BF16 against FP8, on the GPU: wall clock, CUDA time, top host ops.

    python bench/train_step_profile.py [--preset bench-moe] [--precisions bf16 fp8] [--out FILE]

Random token ids (routing at initialization, as in the first steps of a run), so no corpus is needed.
`bf16` and `fp8` are what `dsv3c train` runs on CUDA (routed experts as grouped GEMMs:
train/grouped_experts.py, train/fp8_experts.py); `*-per-expert` is the model's MoE loop, one expert
after another (for FP8 with one Fp8Linear per routed expert), as before the grouping.
Per precision: 3 warm-up steps (the FP8 quantizers compile), the wall clock of 3 synchronized steps, then
torch.profiler over 2 steps: the ops with the most host (self CPU) time and the kernels with the most
device time. A step whose wall clock far exceeds its CUDA time is bound by the host.

`--loop-variants` times (wall clock only) what `dsv3c train` adds around the model: the expert-load
tracker with the balance loss and the bias update, and gradient clipping; `tracker-host-counts` is the
tracker as it was before its counts moved to the device (a host copy in every MoE layer's forward).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from _bootstrap import import_dsv3c

import_dsv3c()

import torch  # noqa: E402
from dsv3c.models.balancing import expert_counts  # noqa: E402
from dsv3c.models.deepseek_v3 import MoE  # noqa: E402
from dsv3c.train.balance import LoadTracker  # noqa: E402
from dsv3c.train.config import TrainConfig, model_config  # noqa: E402
from dsv3c.train.fp8_experts import Fp8GroupedMoE  # noqa: E402
from dsv3c.train.grouped_experts import GroupedMoE  # noqa: E402
from dsv3c.train.loop import build_model, losses, make_optimizer  # noqa: E402

DEVICE = torch.device("cuda")
VARIANTS = ("bare", "tracker", "tracker-host-counts", "tracker+clip")


def _stepper(preset: str, precision: str, batch: int, seq_len: int, vocab: int, variant: str) -> Any:
    per_expert = precision.endswith("-per-expert")  # the model's MoE loop, one expert after another
    train = TrainConfig(
        precision=precision.removesuffix("-per-expert"), device=DEVICE.type, batch_size=batch, seq_len=seq_len, seed=0
    )
    config = model_config(preset, None).replace(vocab_size=vocab)
    model = build_model(config, train, DEVICE).train()
    if per_expert:
        for module in model.modules():
            if isinstance(module, (Fp8GroupedMoE, GroupedMoE)):
                module.__class__ = MoE
    opt = make_optimizer(model, train)
    gen = torch.Generator().manual_seed(0)
    tracker = LoadTracker(model, train.balance_alpha) if variant != "bare" else None
    if tracker is not None and variant == "tracker-host-counts":
        tracker.counts = [c.cpu() for c in tracker.counts]
        for h in tracker._handles:
            h.remove()

        def host_hook(index: int) -> Any:  # the hook as it was: each layer's counts copied to the host
            def hook(router: Any, inputs: Any, output: Any) -> None:
                n = tracker.counts[index].numel()
                tracker.counts[index] += expert_counts(output[1].detach(), n).cpu().float()
                if tracker.alpha > 0:
                    tracker.loss_terms.append(tracker._sequence_loss(router, inputs[0], output[1], n))

            return hook

        tracker._handles = [r.register_forward_hook(host_hook(i)) for i, r in enumerate(tracker.routers)]

    def step() -> None:
        window = torch.randint(vocab, (batch, seq_len + 1 + len(model.mtp)), generator=gen).to(DEVICE)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=DEVICE.type == "cuda"):
            main, mtp = losses(model, window, seq_len)
            loss = main + 0.3 * sum(mtp)
            if tracker is not None:
                tracker.batch_size = batch
                balance = tracker.take_loss()
                loss = loss + balance if balance is not None else loss
        opt.zero_grad()
        loss.backward()
        if variant == "tracker+clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        if tracker is not None:
            tracker.step(train.bias_gamma)

    return step


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _wall_ms(step: Any, steps: int = 3) -> float:
    for _ in range(3):
        step()
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return (time.perf_counter() - start) / steps * 1e3


def loop_variants(preset: str, precision: str, batch: int, seq_len: int, vocab: int) -> dict[str, float]:
    out = {}
    for variant in VARIANTS:
        out[variant] = _wall_ms(_stepper(preset, precision, batch, seq_len, vocab, variant))
        print(f"{precision} {variant}: {out[variant]:.0f} ms/step", flush=True)
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    return out


def profile(preset: str, precision: str, batch: int, seq_len: int, vocab: int, top: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = _stepper(preset, precision, batch, seq_len, vocab, "bare")
    wall_ms = _wall_ms(step)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        _sync()
    events = prof.key_averages()
    cuda_ms = sum(e.self_device_time_total for e in events) / 2 / 1e3
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    device = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    return {
        "precision": precision,
        "wall_ms_per_step": wall_ms,
        "cuda_ms_per_step": cuda_ms,
        "host_ops": [
            {"op": e.key, "calls_per_step": e.count / 2, "self_cpu_ms_per_step": e.self_cpu_time_total / 2e3}
            for e in host
        ],
        "device_kernels": [
            {"kernel": e.key[:120], "calls_per_step": e.count / 2, "ms_per_step": e.self_device_time_total / 2e3}
            for e in device
        ],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench-moe")
    p.add_argument(
        "--precisions",
        nargs="+",
        default=["bf16", "bf16-per-expert", "fp8", "fp8-per-expert"],
        choices=["bf16", "bf16-per-expert", "fp8", "fp8-per-expert", "fp32"],
        help="bf16, fp8: routed experts as grouped GEMMs (what dsv3c train runs on CUDA); *-per-expert: the "
        "model's MoE loop (for fp8 one Fp8Linear per expert)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=4096, help="the token ids' range (the corpus tokenizer's size)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--loop-variants", action="store_true", help="time the training loop's additions instead")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of the script")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("train_step_profile: error: no CUDA device; run this on the GPU machine", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "command": "python bench/train_step_profile.py " + " ".join(sys.argv[1:]),
        "commit": args.commit,
        "machine": {
            "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
            "torch": torch.__version__,
        },
        "rows": [],
    }
    for precision in args.precisions:
        if args.loop_variants:
            variants = loop_variants(args.preset, precision, args.batch_size, args.seq_len, args.vocab)
            result["rows"].append({"precision": precision, "wall_ms_per_step": variants})
            if args.out:
                args.out.write_text(json.dumps(result, indent=1) + "\n")
            continue
        row = profile(args.preset, precision, args.batch_size, args.seq_len, args.vocab, args.top)
        print(f"{precision}: wall {row['wall_ms_per_step']:.0f} ms/step, CUDA {row['cuda_ms_per_step']:.0f} ms")
        for op in row["host_ops"]:
            print(f"  host {op['self_cpu_ms_per_step']:8.1f} ms  {op['calls_per_step']:7.0f} calls  {op['op']}")
        for k in row["device_kernels"][:8]:
            print(f"  cuda {k['ms_per_step']:8.1f} ms  {k['calls_per_step']:7.0f} calls  {k['kernel'][:80]}")
        result["rows"].append(row)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
