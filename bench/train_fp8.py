"""FP8 vs BF16 training on the GPU: the same MoE, seed and data order, and GEMMs at DeepSeek-V3's shapes.

    python bench/train_fp8.py --data TOKENS_DIR --out bench/results/train_fp8.json [--steps N] [--gamma0-steps N]
    python bench/train_fp8.py --plot bench/results/train_fp8.json      # the PNG beside it (needs matplotlib)
    python bench/train_fp8.py --combine A.json B.json --out C.json     # runs made in separate calls, one result
        [--cut-off fp8=METRICS.jsonl --cut-off-steps N]                  # a run the call's time limit cut off
        [--gemm-from GEMMS.json]                                          # the GEMM rows of another call

A device call may be too short for all three runs: `--runs fp8` in one call and `--runs bf16 bf16-gamma0` in
the next (same --steps), then `--combine` joins them (and the GEMM rows of an earlier file) into one result.

Trains the `bench-moe` preset (hidden 2048, 8 layers, 32 routed experts, MTP depth 1) three times:
BF16 and FP8 (DeepSeek's recipe) with bias balancing (gamma 1e-3), and BF16 with gamma 0 (expert load
without balancing); `--runs bf16-repeat bf16-seed1` adds BF16's own spread (the same run again, and
seed 1: another initialization, data order and validation windows). Records final train/val loss, FP8's
relative loss error, step time, the share of CUDA time spent in GEMM kernels (torch.profiler over 3 steps),
tokens/s and peak memory; then times forward GEMMs (bf16 vs FP8 block-scaled, GEMM alone and with the
online quantization) at hidden 7168.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _bootstrap import import_dsv3c

import_dsv3c()

import torch  # noqa: E402
from dsv3c.runtime.bench.memory import device_bandwidth  # noqa: E402
from dsv3c.train.config import TrainConfig, model_config  # noqa: E402
from dsv3c.train.corpus import load_corpus  # noqa: E402
from dsv3c.train.fp8_linear import Fp8Recipe, fp8_linear, fp8_matmul, quantizer  # noqa: E402
from dsv3c.train.loop import build_model, losses, make_optimizer, train_model  # noqa: E402

GEMM_KERNELS = ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "matmul", "scaled_mm")
RUN_ORDER = ("bf16", "fp8", "bf16-gamma0", "bf16-repeat", "bf16-seed1")


def _gpu_time(fn: Any, iters: int = 20) -> float:
    """Median milliseconds of fn() on the GPU."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _gemm_row(name: str, m: int, k: int, n: int, bandwidth: float) -> dict[str, Any]:
    from dsv3c.train import fp8_quant as fq
    from dsv3c.train.fp8_linear import scaled_mm_tile_block

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * 0.02
    wb = w.bfloat16()
    recipe = Fp8Recipe(backend="scaled_mm")  # the quantizers as Triton kernels where triton is installed
    compiled = Fp8Recipe(backend="scaled_mm", triton=False)  # as torch.compile'd torch ops
    qx, sx = fq.quantize_tiles(x)
    qw, sw = fq.quantize_blocks(w)
    bf16 = _gpu_time(lambda: x @ wb.t())
    gemm = _gpu_time(lambda: scaled_mm_tile_block(qx, sx, qw, sw))
    e2e = _gpu_time(lambda: fp8_matmul(x, w, recipe))
    e2e_compiled = _gpu_time(lambda: fp8_matmul(x, w, compiled))
    quant = {}
    for kind, r in (("triton", recipe), ("compiled", compiled)):
        tiles, blocks = quantizer("quantize_tiles", r, x.device), quantizer("quantize_blocks", r, x.device)
        quant[kind] = (_gpu_time(lambda t=tiles: t(x, False)), _gpu_time(lambda b=blocks: b(w, False)))
    # what one pass over the bytes costs: x read (bf16) and written (fp8), w read (float32) and written
    floor_ms = (x.numel() * 3 + w.numel() * 5) / bandwidth * 1e3
    xt = x.float().requires_grad_()
    wt = w.clone().requires_grad_()
    xb, wbb = x.clone().requires_grad_(), wb.clone().requires_grad_()
    go = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    fwd_bwd_fp8 = _gpu_time(lambda: fp8_linear(xt, wt, recipe).backward(go), iters=10)
    fwd_bwd_bf16 = _gpu_time(lambda: (xb @ wbb.t()).backward(go), iters=10)
    flop = 2 * m * k * n
    rel = float((fp8_matmul(x, w, recipe).float() - x.float() @ w.t()).norm() / (x.float() @ w.t()).norm())
    return {
        "gemm": name,
        "m": m,
        "k": k,
        "n": n,
        "bf16_ms": bf16,
        "fp8_gemm_ms": gemm,
        "fp8_with_quant_ms": e2e,
        "fp8_with_quant_compiled_ms": e2e_compiled,
        "quantize_x_ms": {k: v[0] for k, v in quant.items()},
        "quantize_w_ms": {k: v[1] for k, v in quant.items()},
        "quantize_bandwidth_floor_ms": floor_ms,
        "bf16_tflops": flop / bf16 / 1e9,
        "fp8_tflops": flop / gemm / 1e9,
        "speedup_gemm": bf16 / gemm,
        "speedup_with_quant": bf16 / e2e,
        "speedup_with_quant_compiled": bf16 / e2e_compiled,
        "fwd_bwd_bf16_ms": fwd_bwd_bf16,
        "fwd_bwd_fp8_ms": fwd_bwd_fp8,
        "speedup_fwd_bwd": fwd_bwd_bf16 / fwd_bwd_fp8,
        "fp8_rel_error_vs_fp32": rel,
    }


def gemm_comparison() -> list[dict[str, Any]]:
    """Forward GEMMs of V3 (hidden 7168) at 8192 tokens: bf16 vs FP8 1x128/128x128, GEMM alone and end to end."""
    rows = []
    m = 8192
    bandwidth = device_bandwidth()
    for name, k, n in [
        ("q_a_proj", 7168, 1536),
        ("expert up", 7168, 2048),
        ("expert down", 2048, 7168),
        ("dense up", 7168, 18432),
        ("o_proj", 16384, 7168),
    ]:
        rows.append(_gemm_row(name, m, k, n, bandwidth))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def profile_steps(config: Any, train: TrainConfig, corpus: Any, steps: int = 3) -> dict[str, float]:
    """CUDA time per step and the part of it in GEMM kernels, from torch.profiler."""
    from dsv3c.train.data import WindowBatches
    from torch.profiler import ProfilerActivity, profile

    model = build_model(config.replace(vocab_size=corpus.vocab_size), train, torch.device("cuda")).train()
    opt = make_optimizer(model, train)
    data = WindowBatches(corpus.train, train.seq_len, len(model.mtp), train.batch_size, train.seed)

    def step(i: int) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            main, mtp = losses(model, data.batch(i).cuda(), train.seq_len)
            loss = main + 0.3 * mtp[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    for i in range(2):
        step(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(2 + i)
        torch.cuda.synchronize()
    total = gemm = 0.0
    for event in prof.key_averages():
        t = event.self_device_time_total
        total += t
        if any(s in event.key.lower() for s in GEMM_KERNELS):
            gemm += t
    return {"cuda_ms_per_step": total / steps / 1e3, "gemm_ms_per_step": gemm / steps / 1e3}


def run_training(args: argparse.Namespace, corpus: Any, save: Any) -> list[dict[str, Any]]:
    config = model_config(args.preset, None)
    base = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=0,
        device="cuda",
        lr=args.lr,
        warmup_steps=max(1, args.steps // 10),
        val_every=max(1, args.steps // 4),
        val_batches=8,
        log_every=5,
        save_every=10**9,
        bias_gamma=1e-3,
    )
    # bf16-repeat: bf16 again, same seed and data order (the spread from GPU nondeterminism alone);
    # bf16-seed1: another seed (initialization and data order), BF16's run-to-run spread
    runs = [
        ("bf16", "bf16", 1e-3, args.steps, 0),
        ("fp8", "fp8", 1e-3, args.steps, 0),
        ("bf16-gamma0", "bf16", 0.0, args.gamma0_steps, 0),
        ("bf16-repeat", "bf16", 1e-3, args.steps, 0),
        ("bf16-seed1", "bf16", 1e-3, args.steps, 1),
    ]
    results = []
    for name, precision, gamma, steps, seed in runs:
        if steps <= 0 or name not in args.runs:
            continue
        train = dataclasses.replace(
            base,
            precision=precision,
            bias_gamma=gamma,
            seed=seed,
            steps=steps,
            warmup_steps=base.warmup_steps,
            val_every=max(1, steps // 4),
        )
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = train_model(config, corpus, Path(args.work) / name, train, save_dtype="bf16")
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated()
        metrics = result.metrics
        tps = [m["tokens_per_s"] for m in metrics[len(metrics) // 4 :] if "val_loss" not in m]
        tokens_per_step = train.batch_size * train.seq_len
        row = {
            "run": name,
            "precision": precision,
            "gamma": gamma,
            "steps": steps,
            "tokens": result.tokens,
            "seconds": seconds,
            "final_train_loss": statistics.mean(m["lm_loss"] for m in metrics[-4:]),
            "final_val_loss": next(m["val_loss"] for m in reversed(metrics) if "val_loss" in m),
            "tokens_per_s": statistics.median(tps) if tps else None,
            "step_ms": tokens_per_step / statistics.median(tps) * 1e3 if tps else None,
            "peak_memory_gib": peak / 2**30,
            "load_max_mean": statistics.mean(m["load_max_mean"] for m in metrics),
            "load_max_mean_last_half": statistics.mean(m["load_max_mean"] for m in metrics[len(metrics) // 2 :]),
            "curve": [
                {k: m[k] for k in ("step", "tokens", "lm_loss", "val_loss", "load_max_mean") if k in m} for m in metrics
            ],
        }
        if name in ("bf16", "fp8"):
            row.update(profile_steps(config, train, corpus))
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
        results.append(row)
        save(results)  # written after every run: a run cut short by the time limit keeps the ones before
        torch.cuda.empty_cache()
    return results


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["run"]: r for r in runs}
    out: dict[str, Any] = {}
    if "bf16" in by and "fp8" in by and "final_train_loss" in by["fp8"]:
        b, f = by["bf16"], by["fp8"]
        out["fp8_rel_train_loss_error"] = abs(f["final_train_loss"] - b["final_train_loss"]) / b["final_train_loss"]
        out["fp8_rel_val_loss_error"] = abs(f["final_val_loss"] - b["final_val_loss"]) / b["final_val_loss"]
        if b.get("step_ms") and f.get("step_ms"):
            out["fp8_step_speedup"] = b["step_ms"] / f["step_ms"]
        if b.get("gemm_ms_per_step") and f.get("gemm_ms_per_step"):
            out["fp8_gemm_speedup"] = b["gemm_ms_per_step"] / f["gemm_ms_per_step"]
    if "bf16" in by and "bf16-gamma0" in by:
        n = by["bf16-gamma0"]["steps"]
        same = [m["load_max_mean"] for m in by["bf16"]["curve"] if m["step"] <= n]
        out["load_max_mean_gamma_1e-3"] = statistics.mean(same)
        out["load_max_mean_gamma_0"] = by["bf16-gamma0"]["load_max_mean"]
    # BF16 against itself: what a difference of FP8 from BF16 has to be set against
    if "bf16" in by and "bf16-repeat" in by:
        b, r = by["bf16"], by["bf16-repeat"]
        out["bf16_repeat_identical"] = (b["final_train_loss"], b["final_val_loss"]) == (
            r["final_train_loss"],
            r["final_val_loss"],
        )
    if "bf16" in by and "bf16-seed1" in by and "final_train_loss" in by["bf16-seed1"]:
        b, s = by["bf16"], by["bf16-seed1"]
        out["bf16_seed1_rel_train_loss"] = (s["final_train_loss"] - b["final_train_loss"]) / b["final_train_loss"]
        out["bf16_seed1_rel_val_loss"] = (s["final_val_loss"] - b["final_val_loss"]) / b["final_val_loss"]
    return out


def cut_off_run(name: str, metrics: Path, planned_steps: int) -> dict[str, Any]:
    """A run the device call's time limit stopped: its curve so far (metrics.jsonl), no final numbers.
    Its learning-rate schedule is the planned run's, so its curve compares step for step with a
    finished run of the same planned steps."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    tps = [m["tokens_per_s"] for m in rows[len(rows) // 4 :] if "val_loss" not in m]
    return {
        "run": name,
        "precision": "fp8" if name.startswith("fp8") else "bf16",
        "steps": planned_steps,
        "cut_off_at_step": rows[-1]["step"],
        "tokens_per_s": statistics.median(tps) if tps else None,
        "load_max_mean": statistics.mean(m["load_max_mean"] for m in rows),
        "curve": [
            {k: m[k] for k in ("step", "tokens", "lm_loss", "val_loss", "load_max_mean") if k in m} for m in rows
        ],
    }


def compare_curves(a: dict[str, Any], b: dict[str, Any], last: int = 5) -> dict[str, Any]:
    """b against a on the steps both reached: train loss over the last `last` logged steps, val loss at
    each validation step both made (relative, signed: > 0 means b is worse)."""
    a_at = {m["step"]: m for m in a["curve"]}
    common = [m for m in b["curve"] if m["step"] in a_at and "val_loss" not in m][-last:]
    ta = statistics.mean(a_at[m["step"]]["lm_loss"] for m in common)
    tb = statistics.mean(m["lm_loss"] for m in common)
    vals = {
        m["step"]: (m["val_loss"] - a_at[m["step"]]["val_loss"]) / a_at[m["step"]]["val_loss"]
        for m in b["curve"]
        if "val_loss" in m and "val_loss" in a_at.get(m["step"], {})
    }
    return {"steps": [m["step"] for m in common], "rel_train_loss": (tb - ta) / ta, "rel_val_loss_at_step": vals}


def combine(
    paths: list[Path], cut_off: dict[str, Path] | None = None, cut_off_steps: int = 0, gemm_from: Path | None = None
) -> dict[str, Any]:
    """One result from several files: every run (a later file's run replaces an earlier one of the same
    name), the GEMM rows of `gemm_from` (else of the last file that has them), each file's command,
    commit and machine."""
    parts = [json.loads(p.read_text()) for p in paths]
    runs: dict[str, dict[str, Any]] = {}
    for part in parts:
        for run in part.get("runs", []):
            runs[run["run"]] = {**run, "commit": part["commit"], "command": part["command"]}
    for name, metrics in (cut_off or {}).items():
        runs[name] = cut_off_run(name, metrics, cut_off_steps)
    steps = {r["steps"] for r in runs.values() if r["run"] in ("bf16", "fp8")}
    if len(steps) > 1:
        raise SystemExit(f"train_fp8: error: the bf16 and fp8 runs differ in steps ({sorted(steps)}); rerun one")
    result: dict[str, Any] = {
        "command": "python bench/train_fp8.py --combine " + " ".join(str(p) for p in paths),
        "parts": [{k: part.get(k) for k in ("command", "commit", "machine")} for part in parts],
        "commit": parts[-1]["commit"],
        "machine": parts[-1]["machine"],
        "corpus": next((p["corpus"] for p in parts if "corpus" in p), None),
    }
    gemm_parts = [json.loads(gemm_from.read_text())] if gemm_from else [p for p in parts if p.get("gemm")]
    if gemm_parts:
        result["gemm"] = gemm_parts[-1]["gemm"]
        result["gemm_commit"] = gemm_parts[-1]["commit"]
        result["gemm_command"] = gemm_parts[-1]["command"]
    ordered = [runs[n] for n in RUN_ORDER if n in runs]
    result["runs"], result["summary"] = ordered, summarize(ordered)
    if "bf16" in runs and "fp8" in runs:
        result["summary"]["fp8_vs_bf16_on_common_steps"] = compare_curves(runs["bf16"], runs["fp8"])
        if runs["bf16"].get("tokens_per_s") and runs["fp8"].get("tokens_per_s"):
            result["summary"]["fp8_tokens_per_s_ratio"] = runs["fp8"]["tokens_per_s"] / runs["bf16"]["tokens_per_s"]
    return result


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in data.get("runs", []):
        curve = run["curve"]
        axes[0].plot([m["tokens"] for m in curve], [m["lm_loss"] for m in curve], label=run["run"])
        val = [m for m in curve if "val_loss" in m]
        axes[0].plot([m["tokens"] for m in val], [m["val_loss"] for m in val], "o--", label=f"{run['run']} val")
        axes[1].plot([m["step"] for m in curve], [m["load_max_mean"] for m in curve], label=run["run"])
    axes[0].set(xlabel="tokens", ylabel="next-token loss (nats)", title="bench-moe: BF16 vs FP8")
    axes[1].set(xlabel="step", ylabel="expert load max/mean", title="auxiliary-loss-free balancing")
    gemms = data.get("gemm", [])
    if gemms:
        names = [g["gemm"] for g in gemms]
        x = range(len(names))
        bars = [("speedup_gemm", "GEMM only"), ("speedup_with_quant", "with quantization")]
        if "speedup_with_quant_compiled" in gemms[0]:
            bars = [*bars, ("speedup_with_quant_compiled", "with quantization (torch.compile)")]
        bars.append(("speedup_fwd_bwd", "fwd+bwd"))
        width = 0.8 / len(bars)
        for j, (key, label) in enumerate(bars):
            offset = (j - (len(bars) - 1) / 2) * width
            axes[2].bar([i + offset for i in x], [g[key] for g in gemms], width, label=label)
        axes[2].axhline(1.0, color="gray")
        axes[2].set_xticks(list(x), names, rotation=20)
        axes[2].set(ylabel="FP8 speed / BF16", title="hidden 7168, 8192 tokens")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=100)


def _write(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="text folder or token cache (tokens.npy + tokenizer.json + corpus.json)")
    p.add_argument("--out", type=Path, help="results JSON")
    p.add_argument("--work", type=Path, default=Path("/tmp/train-fp8-bench"), help="checkpoints of the runs")
    p.add_argument("--preset", default="bench-moe")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--gamma0-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--skip-gemm", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--commit", default="unknown", help="the commit measured (the GPU copy has no .git)")
    p.add_argument("--plot", type=Path, help="only draw the PNG of an existing results JSON")
    p.add_argument(
        "--runs",
        nargs="+",
        choices=list(RUN_ORDER),
        default=["bf16", "fp8", "bf16-gamma0"],
        help="which training runs to make (default: all three)",
    )
    p.add_argument("--combine", type=Path, nargs="+", help="join results JSONs of separate calls into --out")
    p.add_argument(
        "--cut-off", action="append", default=[], metavar="RUN=METRICS", help="with --combine: a cut-off run"
    )
    p.add_argument("--cut-off-steps", type=int, default=0, help="the steps the cut-off runs were planned for")
    p.add_argument("--gemm-from", type=Path, help="with --combine: take the GEMM rows (only) from this results JSON")
    args = p.parse_args()
    if args.plot:
        plot(args.plot)
        return 0
    if args.combine:
        cut = dict((k, Path(v)) for k, v in (c.split("=", 1) for c in args.cut_off))
        combined = combine(args.combine, cut, args.cut_off_steps, args.gemm_from)
        _write(args.out, combined)
        if args.out is not None:
            plot(args.out)
        print(json.dumps(combined["summary"], indent=1))
        return 0
    if not torch.cuda.is_available():
        print("train_fp8: error: no CUDA device; run this on the GPU machine", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "command": "python bench/train_fp8.py " + " ".join(sys.argv[1:]),
        "commit": args.commit,
        "machine": {
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    if not args.skip_gemm:
        result["gemm"] = gemm_comparison()
        from dsv3c.train import fp8_linear

        result["wgrad_scaled_mm_layout"] = [str(x) for x in fp8_linear._TILE_TILE_LAYOUT]
        _write(args.out, result)
    if not args.skip_train:
        corpus = load_corpus(args.data)
        result["corpus"] = {k: corpus.origin.get(k) for k in ("sources", "sha256", "tokens")}
        from dsv3c.train import fp8_linear

        def save(runs: list[dict[str, Any]]) -> None:
            result["runs"], result["summary"] = runs, summarize(runs)
            result["wgrad_scaled_mm_layout"] = [str(x) for x in fp8_linear._TILE_TILE_LAYOUT]
            _write(args.out, result)

        run_training(args, corpus, save)
    _write(args.out, result)
    print(json.dumps(result.get("summary", {}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
