"""What TensorRT's MXFP8 activations (1x32 blocks, power-of-two E8M0 scales) change in loss, vs DeepSeek's
online 1x128 tiles, on a trained model, emulated in onnxruntime (no TensorRT engine runs on the GPUs here).

    python bench/mxfp8_fidelity.py --checkpoint runs/small-bf16 --data runs/tokens --max-tokens 2048 \\
        --out bench/results/mxfp8_fidelity_small-bf16_cpu.json

Every variant is made and measured with dsv3c's own commands, run as a user would (the commands are in
the result): export -> quantize (FP8 128x128 weights, online 1x128 activation tiles: the default) ->
`lower --target portable --activations mxfp8` (the numbers `lower --target trt --activations mxfp8` gives
TensorRT, in standard ONNX ops); `quantize --pow2-scales` separates the power-of-two rounding from the
finer blocks; `--mxfp8-weights` also re-quantizes the FP8 weights those activations meet to MXFP8 (what a
block-scaled MXFP8 GEMM reads). Each is scored by `dsv3c eval FOLDER --data DATA --against CHECKPOINT
--json` (reference: the checkpoint in PyTorch fp32; relative loss error, top-1 agreement, KL per token).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _bootstrap import import_dsv3c

# name -> (how it is made from the canonical export, the folder it reads from)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "canonical export (control)": ("canonical", []),
    "fp8 1x128 online (today)": ("canonical", ["quantize"]),
    "fp8 1x128 online, power-of-two scales": ("canonical", ["quantize", "--pow2-scales"]),
    "mxfp8 1x32 E8M0 (TensorRT, emulated)": ("fp8 1x128 online (today)", ["lower", "--target", "portable"]),
    "mxfp8 activations and weights (emulated)": (
        "fp8 1x128 online (today)",
        ["lower", "--target", "portable", "--mxfp8-weights"],
    ),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="held-out text (file, folder, or training corpus)")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), help="default: all")
    p.add_argument("--work", type=Path, default=Path("/tmp/dsv3c-mxfp8-fidelity"))
    p.add_argument("--out", type=Path)
    return p.parse_args()


def dsv3c(*argv: str) -> tuple[str, list[str]]:
    """Run one dsv3c command; returns (stdout, the command as run)."""
    command = [sys.executable, "-m", "dsv3c", *argv]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"mxfp8_fidelity: {' '.join(command)} failed: {done.stderr.strip()[-400:]}")
    return done.stdout, ["dsv3c", *argv]


def make(name: str, args: argparse.Namespace, folders: dict[str, Path], commands: list[list[str]]) -> Path:
    """The folder of variant `name` under --work (made once; reused while it exists)."""
    if name in folders:
        return folders[name]
    source, how = VARIANTS[name]
    out = args.work / name.split(" (")[0].replace(" ", "-").replace(",", "")
    if source == "canonical":
        src = args.work / "canonical"
        if not (src / "manifest.json").is_file():
            commands.append(dsv3c("export", str(args.checkpoint), "--out", str(src), "--force")[1])
    else:
        src = make(source, args, folders, commands)
    if not how:
        folders[name] = src
        return src
    if not (out / "manifest.json").is_file():
        extra = ["--activations", "mxfp8"] if how[0] == "lower" else []
        commands.append(dsv3c(how[0], str(src), "--out", str(out), *how[1:], *extra, "--force")[1])
    folders[name] = out
    return out


def main() -> int:
    import_dsv3c()
    from dsv3c.eval.record import run_record, write_result

    args = parse()
    args.work.mkdir(parents=True, exist_ok=True)
    folders: dict[str, Path] = {}
    commands: list[list[str]] = []
    rows: list[dict[str, Any]] = []
    for name in args.variants or list(VARIANTS):
        folder = make(name, args, folders, commands)
        start = time.perf_counter()
        text, command = dsv3c(
            "eval", str(folder), "--data", str(args.data), "--against", str(args.checkpoint), "--json",
            "--max-tokens", str(args.max_tokens), "--window", str(args.window), "--threads", str(args.threads),
        )  # fmt: skip
        result = json.loads(text)
        rows.append({"variant": name, "folder": str(folder), "eval_command": command, "eval": result})
        rows[-1]["eval_seconds"] = round(time.perf_counter() - start, 1)
        print(row_line(rows[-1]), flush=True)
    out = {
        **run_record(),
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "max_tokens": args.max_tokens,
        "window": args.window,
        "emulation": "MXFP8 in standard ONNX ops (passes/mxfp8.py): per 1x32 block s = 2^ceil(log2(amax / 448)), "
        "E4M3 round to nearest even, dequantize; weights stay DeepSeek's 128x128 FP8 blocks except with "
        "--mxfp8-weights (the same rule per 1x32 block of a weight row, from the dequantized FP8 weight)",
        "commands": commands,
        "rows": rows,
    }
    print(table(out))
    if args.out:
        write_result(args.out, out)
        print(f"wrote {args.out}")
    return 0


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    """One `dsv3c eval --json` object: loss, rel_loss_error, top1_agreement, kl_mean, kl_max, ..."""
    metrics: dict[str, Any] = row["eval"]
    return metrics


def row_line(row: dict[str, Any]) -> str:
    m = _metrics(row)
    return (
        f"{row['variant']}: loss {m.get('loss', float('nan')):.4f}, rel. loss error "
        f"{m.get('rel_loss_error', float('nan')):+.4%}, top-1 {m.get('top1_agreement', float('nan')):.2%}, "
        f"KL {m.get('kl_mean', float('nan')):.3e} ({row['eval_seconds']} s)"
    )


def table(result: dict[str, Any]) -> str:
    lines = [
        "| variant | loss | rel. loss error | top-1 agreement | KL nats/token |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        m = _metrics(row)
        lines.append(
            f"| {row['variant']} | {m.get('loss', float('nan')):.4f} | {m.get('rel_loss_error', float('nan')):+.4%} "
            f"| {m.get('top1_agreement', float('nan')):.2%} | {m.get('kl_mean', float('nan')):.3e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
