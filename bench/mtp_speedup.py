"""MTP speculative decoding vs plain greedy on a trained model: acceptance per depth, tokens per call, speedup.

    python bench/mtp_speedup.py --checkpoint runs/small-bf16 --data HELDOUT_TEXT --out bench/results/mtp.json
    python bench/mtp_speedup.py --checkpoint CK --export EX --runtimes torch ort --threads 1 --new-tokens 64

Prompts are consecutive stretches of held-out text (the checkpoint's tokenizer.json); each is decoded at
batch 1, greedily and with MTP drafts at each depth (1 .. the model's MTP modules, chained; --depths picks),
side by side in one run (eval/speedup.py), on PyTorch (the checkpoint) and onnxruntime (the export; made
under --work when not given). One row per runtime and depth; the speculative output is checked token for
token against greedy. On the CPU pass --threads to pin the intra-op threads; `--device cuda` runs PyTorch on
the GPU and onnxruntime on its CUDA provider (onnxruntime-gpu).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _bootstrap import import_dsv3c


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="trained checkpoint folder (with tokenizer.json)")
    p.add_argument("--export", type=Path, help="its export folder (default: exported under --work)")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="held-out text file or folder, or a training corpus folder (its held-out split)",
    )
    p.add_argument("--runtimes", nargs="+", choices=["torch", "ort"], default=["torch", "ort"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--depths", type=int, nargs="+", help="drafting depths to time (default: 1 .. all MTP modules)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--work", type=Path, default=Path("/tmp/dsv3c-mtp-bench"))
    p.add_argument("--out", type=Path, help="write the rows and the run record as JSON")
    return p.parse_args()


def main() -> int:
    import_dsv3c()
    import json

    import torch
    from dsv3c.errors import UserError
    from dsv3c.eval.record import run_record, write_result
    from dsv3c.eval.speedup import measure_speedup, text_prompts
    from dsv3c.eval.text import heldout_stream, is_corpus, token_stream
    from dsv3c.eval.tokens import find_tokenizer, val_fraction
    from dsv3c.runtime.loading import open_engine

    args = parse()
    try:
        torch.set_num_threads(args.threads)
        spacing = 4 * args.prompt_tokens
        tokenizer, needed = find_tokenizer(args.checkpoint), args.prompts * spacing
        if is_corpus(args.data):  # a training corpus: prompts from its held-out split
            ids = heldout_stream(args.data, tokenizer, needed, val_fraction(args.checkpoint))
        else:
            ids = token_stream(args.data, tokenizer, needed)
        prompts = text_prompts(ids, args.prompts, args.prompt_tokens, spacing)
        if len(prompts) < args.prompts:
            raise UserError(f"--data gave {len(prompts)} prompts, fewer than --prompts {args.prompts}")
        rows = []
        for runtime in args.runtimes:
            folder = args.checkpoint if runtime == "torch" else export_folder(args)
            engine = open_engine(folder, runtime, args.device, "fp32", args.threads)
            for row in measure_speedup(engine, runtime, prompts, args.new_tokens, args.repeats, args.depths):
                rows.append(row.to_dict())
                per_depth = " / ".join(f"{rate:.1%}" for rate in row.acceptance_per_depth)
                print(
                    f"{runtime:5s} depth {row.depth}: acceptance per depth {per_depth}, "
                    f"{row.tokens_per_call:.2f} tokens/call, greedy {row.greedy_tokens_per_s:.1f} tok/s, "
                    f"mtp {row.mtp_tokens_per_s:.1f} tok/s, speedup {row.speedup:.2f}x, "
                    f"identical to greedy: {row.identical}"
                )
    except UserError as e:
        print(f"mtp_speedup: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        record = {**run_record(), "checkpoint": str(args.checkpoint), "data": str(args.data)}
        config = json.loads((args.checkpoint / "config.json").read_text())
        record["device"], record["mtp_modules"] = args.device, config.get("num_nextn_predict_layers", 0)
        trained = args.checkpoint / "training.json"  # how dsv3c train made it: corpus, settings, final losses
        if trained.is_file():
            record["training"] = json.loads(trained.read_text())
        record["rows"] = rows
        write_result(args.out, record)
        print(f"wrote {args.out}")
    print(json.dumps(rows) if not args.out else "", end="")
    return 0 if all(r["identical"] for r in rows) else 1


def export_folder(args: argparse.Namespace) -> Path:
    if args.export is not None:
        return args.export
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder

    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.work / f"{args.checkpoint.resolve().name}-export"
    if not (folder / "manifest.json").is_file():
        export(from_folder(args.checkpoint), folder, weights="checkpoint", force=True)
    return folder


if __name__ == "__main__":
    sys.exit(main())
