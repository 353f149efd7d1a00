"""dsv3c generate: greedy or sampled generation over the latent cache, with PyTorch or onnxruntime.

dsv3c generate CKPT --prompt-ids 1,2,3 --prompt-ids 4,5        # PyTorch, a batch of two prompts
dsv3c generate EXPORT --runtime ort --mtp --json               # onnxruntime, MTP speculative decoding
dsv3c generate EXPORT --mtp --mtp-depth 1                      # draft with the first MTP module only
dsv3c generate EXPORT --prompt "Hello" --device cuda           # text via tokenizer.json, CUDA EP
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv3c.cli.args import thread_count
from dsv3c.errors import UserError
from dsv3c.runtime.sampling import SamplingConfig

if TYPE_CHECKING:
    from dsv3c.runtime.speculative import SpecStats

HELP = "generate tokens from a checkpoint folder (PyTorch) or an export folder (onnxruntime)"


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="checkpoint folder (config.json + safetensors) or export folder")
    p.add_argument(
        "--prompt-ids",
        type=_ids,
        action="append",
        default=[],
        metavar="IDS",
        help="comma-separated prompt token ids; repeat for a batch",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="prompt text (needs tokenizer.json and the tokenizers package); repeatable",
    )
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument(
        "--runtime",
        choices=["auto", "torch", "ort"],
        default="auto",
        help="auto (default): ort for an export folder, torch for a checkpoint folder",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: torch on the GPU, or onnxruntime-gpu's CUDA execution provider",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (torch runtime)")
    p.add_argument("--threads", type=thread_count, default=0, help="intra-op threads (0: the runtime's default)")
    p.add_argument(
        "--mtp",
        action="store_true",
        help="speculative decoding: the model's MTP modules, chained, draft one token each per step",
    )
    p.add_argument(
        "--mtp-depth",
        type=int,
        default=None,
        metavar="D",
        help="with --mtp: draft with the first D MTP modules (default: all of them)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-ids", type=_ids, default=[], help="ids that end a row (EOS from generation_config.json too)")
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"ids": [...]} (a list per prompt with several), "text" and "mtp" if any',
    )
    p.add_argument(
        "--ep",
        type=int,
        default=0,
        metavar="N",
        help="expert parallelism over N ranks, one process each: torchrun --nproc-per-node N -m dsv3c generate ... "
        "--ep N (torch runtime; a checkpoint folder or a `dsv3c partition` folder; rank 0 prints)",
    )
    p.add_argument("--ep-timeout", type=float, default=300.0, metavar="S", help="with --ep: seconds to wait for a peer")


def stop_ids(folder: Path, extra: list[int]) -> list[int]:
    """--stop-ids plus eos_token_id from generation_config.json when the folder has one."""
    from dsv3c.runtime.loading import eos_ids

    return list(extra) + eos_ids(folder)


def _prompts(args: argparse.Namespace) -> tuple[list[list[int]], Any]:
    if args.prompt and args.prompt_ids:
        raise UserError("give either --prompt or --prompt-ids, not both")
    if not args.prompt and not args.prompt_ids:
        raise UserError("no prompt given; pass --prompt-ids 1,2,3 or --prompt TEXT (repeat either for a batch)")
    if not args.prompt:
        return args.prompt_ids, None
    from dsv3c.runtime.loading import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    return [tokenizer.encode(text).ids for text in args.prompt], tokenizer


class _Stream:
    """Prints one row's tokens as they arrive (ids, or text decoded incrementally)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.shown = tokenizer, ""
        self.ids: list[int] = []

    def __call__(self, row: int, token: int) -> None:
        if self.tokenizer is None:
            print(token, end=" ", flush=True)
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        print(text[len(self.shown) :], end="", flush=True)
        self.shown = text


def _open(args: argparse.Namespace) -> tuple[Any, Any]:
    """--ep: this rank's PyTorch engine over its share of the experts, and the rank itself."""
    import torch
    from dsv3c.parallel.session import open_expert_parallel
    from dsv3c.runtime.torch_backend import TorchEngine

    if args.runtime == "ort":
        raise UserError("--ep runs the PyTorch runtime; onnxruntime has no all-to-all (drop --runtime ort)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ep = open_expert_parallel(args.model, args.ep, args.device, dtype, args.ep_timeout)
    return TorchEngine(ep.model), ep


def _print_mtp(stats: SpecStats) -> None:
    """The drafting summary on stderr ("-": a depth no step reached)."""
    rates = zip(stats.acceptance_per_depth, stats.reached, strict=True)
    per_depth = ", ".join(f"{rate:.1%}" if reached else "-" for rate, reached in rates)
    print(
        f"mtp: depth {stats.depth}, acceptance {stats.acceptance_rate:.1%} ({stats.accepted}/{stats.drafted} "
        f"drafts; per depth {per_depth}), {stats.tokens_per_call:.2f} tokens per main-model call",
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    from dsv3c.runtime.engine import EngineBackend
    from dsv3c.runtime.generate import generate
    from dsv3c.runtime.loading import open_engine
    from dsv3c.runtime.speculative import generate_mtp

    if args.mtp_depth is not None and not args.mtp:
        raise UserError("--mtp-depth needs --mtp")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    prompts, tokenizer = _prompts(args)
    if not args.ep and (args.model / "partition.json").is_file():
        from dsv3c.parallel.partition import read_partition

        n = read_partition(args.model).ranks
        raise UserError(
            f"{args.model} is partitioned for {n} ranks: torchrun --nproc-per-node {n} -m dsv3c ... --ep {n}"
        )
    engine, ep = (
        _open(args) if args.ep else (open_engine(args.model, args.runtime, args.device, args.dtype, args.threads), None)
    )
    primary = ep is None or ep.is_primary  # with --ep every rank generates the same tokens; rank 0 prints
    stops = stop_ids(args.model, args.stop_ids)
    stream = _Stream(tokenizer) if primary and not args.json and len(prompts) == 1 else None
    stats = None
    ids: list[list[int]]
    if args.mtp:
        ids, stats = generate_mtp(engine, prompts, args.max_new_tokens, sampling, stops, stream, args.mtp_depth)
    else:
        ids = generate(EngineBackend(engine), prompts, args.max_new_tokens, sampling, stops, stream)
    if ep is not None:
        ep.close()
        if not primary:
            return 0
    texts = [tokenizer.decode(row) for row in ids] if tokenizer is not None else None
    if args.json:
        one = len(ids) == 1
        result: dict[str, Any] = {"ids": ids[0] if one else ids}
        if texts is not None:
            result["text"] = texts[0] if one else texts
        if stats is not None:
            result["mtp"] = stats.to_dict()
        print(json.dumps(result))
    elif stream is not None:
        print()
    else:
        for i, row in enumerate(ids):
            print(texts[i] if texts is not None else " ".join(map(str, row)))
    if stats is not None:
        _print_mtp(stats)
    if ep is not None:
        print(ep.summary(), file=sys.stderr)
    return 0
