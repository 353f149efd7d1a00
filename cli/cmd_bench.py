"""dsv3c bench: prefill and decode tokens/s of onnxruntime, our PyTorch model and transformers, side by side.

    dsv3c bench                                        # small preset, contexts 128 1024, batch 1, ort lowering
    dsv3c bench --contexts 128 1024 4096 --batches 1 8 --json --out bench.json   # also bench.png (matplotlib)
    dsv3c bench --checkpoint CKPT --export EXPORT      # an existing checkpoint and its (lowered) export

Without --checkpoint/--export, a random checkpoint of the preset is written, exported and lowered under
--work (reused on the next run), or under a temporary folder removed at the end. onnxruntime runs the graph
a user deploys on it: `--graph ort` (default: `dsv3c lower --target ort`, float weights, com.microsoft::MoE),
`ort-8bit` (`--weights-8bit`: MatMulNBits / QMoE, with the error the manifest records) or `canonical` (the
export itself: the custom nodes' standard-ONNX bodies).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from dsv3c.cli.args import thread_count
from dsv3c.errors import UserError

HELP = "benchmark prefill and decode: onnxruntime vs PyTorch vs transformers (tokens/s, cache, bandwidth)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help="model preset for a fresh random checkpoint (default: small)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (torch, transformers)")
    p.add_argument("--export", type=Path, help="export folder of that checkpoint (ort)")
    p.add_argument("--work", type=Path, help="folder for the generated checkpoint and export (kept and reused)")
    p.add_argument(
        "--graph",
        choices=["ort", "ort-8bit", "canonical"],
        default="ort",
        help="the graph onnxruntime runs when bench makes the export (default: ort, the lowering to deploy)",
    )
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument(
        "--runtimes", nargs="+", choices=["ort", "torch", "transformers"], default=["ort", "torch", "transformers"]
    )
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per row (after one untimed)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="longest prefill call; longer prompts go in chunks")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="load every runtime first and take turns per cell, so that a change of machine load touches all alike "
        "(default: one runtime at a time: on few cores one runtime's still-spinning threads slow the next; "
        "measured: onnxruntime's CPU decode 45%% slower after PyTorch's turn)",
    )
    p.add_argument("--one-at-a-time", action="store_true", help=argparse.SUPPRESS)  # the default since --interleave
    p.add_argument("--threads", type=thread_count, default=0, help="intra-op threads for every runtime (0: default)")
    p.add_argument("--bandwidth-mb", type=int, default=512, help="size of the copy that measures memory bandwidth")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout (the table goes to stderr)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here (and a PNG plot beside it)")
    p.add_argument("--plot", type=Path, help="PNG plot path (default: --out with .png)")


def prepare(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[Path, Path, Path | None, str]:
    """(checkpoint, export, temporary folder to remove or None, model label)."""
    if (args.checkpoint is None) != (args.export is None):
        raise UserError("pass both --checkpoint and --export (the export of that checkpoint), or neither")
    if args.checkpoint is not None:
        return args.checkpoint, args.export, None, args.checkpoint.name
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder
    from dsv3c.models.checkpoint import init_random, save_model
    from dsv3c.models.config import DeepseekV3Config

    temporary = None if args.work else Path(tempfile.mkdtemp(prefix="dsv3c-bench-"))
    work: Path = args.work or temporary  # type: ignore[assignment]
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, folder = work / f"{args.preset}-checkpoint", work / f"{args.preset}-export"
    if not (checkpoint / "config.json").is_file():
        say(f"writing a random {args.preset} checkpoint to {checkpoint}")
        save_model(init_random(DeepseekV3Config.from_preset(args.preset)), checkpoint, overwrite=True)
    if not (folder / "manifest.json").is_file():
        say(f"exporting {checkpoint} to {folder}")
        export(from_folder(checkpoint), folder, weights="checkpoint", force=True)
    if args.graph != "canonical":
        from dsv3c.passes.lower import lower_folder
        from dsv3c.passes.pipelines import Target

        lowered = work / f"{args.preset}-{args.graph}"
        if not (lowered / "manifest.json").is_file():
            say(f"lowering {folder} to {lowered} (--target ort{' --weights-8bit' if args.graph == 'ort-8bit' else ''})")
            lower_folder(
                folder, lowered, Target.ORT, force=True, weights_8bit=128 if args.graph == "ort-8bit" else None
            )
        folder = lowered
    return checkpoint, folder, temporary, f"{args.preset} ({args.graph})"


def check_pair(checkpoint: Path, folder: Path) -> None:
    from dsv3c.artifact.manifest import read_manifest
    from dsv3c.models.config import DeepseekV3Config

    if not (checkpoint / "config.json").is_file():
        raise UserError(f"{checkpoint}: no config.json; --checkpoint takes a checkpoint folder")
    ours = DeepseekV3Config.from_json(checkpoint / "config.json").to_dict()
    theirs = read_manifest(folder).config
    differ = sorted(k for k in ours if k in theirs and ours[k] != theirs[k] and k != "num_nextn_predict_layers")
    if differ:
        raise UserError(f"{folder} was not exported from {checkpoint}: config differs in {', '.join(differ[:4])}")


def run(args: argparse.Namespace) -> int:
    from dsv3c.runtime.bench.measure import BenchPlan, run_bench
    from dsv3c.runtime.bench.memory import copy_bandwidth, device_bandwidth
    from dsv3c.runtime.bench.report import format_table, plot, write_json
    from dsv3c.runtime.bench.runners import runner_factories

    if min(args.contexts) < 1 or min(args.batches) < 1 or args.steps < 1 or args.prefill_chunk < 1:
        raise UserError("--contexts, --batches, --steps and --prefill-chunk must be positive")
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    checkpoint, folder, temporary, label = prepare(args, say)
    try:
        check_pair(checkpoint, folder)
        bandwidth = copy_bandwidth(args.bandwidth_mb) if args.device == "cpu" else device_bandwidth(args.bandwidth_mb)
        plan = BenchPlan(
            args.contexts,
            args.batches,
            args.runtimes,
            args.steps,
            args.prefill_chunk,
            model=label,
            device=args.device,
            one_at_a_time=not args.interleave,
        )
        rows = run_bench(plan, runner_factories(checkpoint, folder, args.device, args.threads), bandwidth, say)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    say(format_table(rows, bandwidth))
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
    if args.out is not None:
        from dsv3c.eval.record import run_record

        write_json(rows, args.out, run_record(getattr(args, "argv", None)))
        say(f"wrote {args.out}")
    picture = args.plot or (args.out.with_suffix(".png") if args.out is not None else None)
    if picture is not None:
        say(plot(rows, picture))
    return 0
