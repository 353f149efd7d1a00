"""dsv3c eval: validation loss and perplexity on held-out text, optionally against a reference model.

dsv3c eval CKPT --data heldout.txt                          # PyTorch, the checkpoint's tokenizer.json
dsv3c eval EXPORT --data corpus/ --against CKPT --json      # onnxruntime vs the PyTorch reference
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsv3c.cli.args import thread_count
from dsv3c.errors import UserError

HELP = "loss and perplexity on held-out text; with --against, relative loss error, top-1 agreement and KL"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="checkpoint folder (PyTorch) or export folder (onnxruntime)")
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="a UTF-8 text file, a folder of them (sorted), or a training corpus folder (its held-out split)",
    )
    p.add_argument("--against", type=Path, help="reference model folder: compare logits token by token")
    p.add_argument(
        "--runtime",
        choices=["auto", "torch", "ort"],
        default="auto",
        help="auto (default): ort for an export folder, torch for a checkpoint folder (--against: always auto)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (torch runtime)")
    p.add_argument("--window", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens of text to score (default 8192)")
    p.add_argument("--batch", type=int, default=4, help="windows per model call (default 4)")
    p.add_argument("--threads", type=thread_count, default=0, help="intra-op threads (0: the runtime's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object (loss, perplexity, tokens, ...)")


def run(args: argparse.Namespace) -> int:
    from dsv3c.eval.metrics import evaluate, format_result
    from dsv3c.eval.scorer import open_scorer
    from dsv3c.eval.text import eval_windows
    from dsv3c.eval.tokens import find_tokenizer, val_fraction

    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    scorer = open_scorer(args.model, args.runtime, args.device, args.dtype, args.threads)
    max_window = scorer.engine.config.max_position_embeddings
    if args.window > max_window:
        raise UserError(f"--window {args.window} exceeds the model's max_position_embeddings ({max_window})")
    reference = None
    if args.against is not None:
        reference = open_scorer(args.against, "auto", args.device, args.dtype, args.threads)
    models = [args.model, *([args.against] if args.against else [])]
    tokenizer = find_tokenizer(*models)
    windows = eval_windows(args.data, tokenizer, scorer.vocab_size, args.window, args.max_tokens, val_fraction(*models))
    result = evaluate(scorer, windows, args.batch, reference)
    print(json.dumps(result.to_dict()) if args.json else format_result(result))
    return 0
