"""dsv3c train: train a DeepSeek-V3 model on a folder of text (next-token + MTP, bias balancing, BF16 or FP8).

    dsv3c train --prepare CORPUS_DIR                 # corpus from Debian packages + tokenizer.json
    dsv3c train --preset tiny --data CORPUS_DIR --out CKPT [--precision bf16|fp8|fp32] [--steps N | --tokens N]

`--data` takes any folder of UTF-8 text files: tokenized on first use (its own tokenizer.json, else a
byte-level BPE trained on it) and cached by content hash. OUT becomes a checkpoint folder that export,
quantize and generate --prompt take; `--resume` continues from OUT/train_state.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from dsv3c.errors import UserError

HELP = "train a model on a folder of text (MTP, auxiliary-loss-free balancing, BF16 or DeepSeek's FP8 recipe)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prepare", type=Path, metavar="DIR", help="build the Debian-package corpus and tokenizer in DIR, then stop"
    )
    p.add_argument(
        "--packages", default="python3.11-doc,dict-gcide", help="with --prepare: Debian packages to take text from"
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        help="BPE vocabulary for --prepare or a --data folder without tokenizer.json",
    )
    shape = p.add_mutually_exclusive_group()
    shape.add_argument(
        "--preset",
        help="model shape: a model preset (tiny, small, ...) or a training one (quick, eval-small, bench-moe)",
    )
    shape.add_argument("--config", type=Path, help="model shape from a config.json")
    p.add_argument("--data", type=Path, help="folder of UTF-8 text files")
    p.add_argument("--cache-dir", type=Path, help="token cache (default ~/.cache/dsv3c/corpus)")
    p.add_argument("--out", type=Path, help="checkpoint folder to write")
    p.add_argument(
        "--precision",
        choices=("bf16", "fp8", "fp32"),
        default="bf16",
        help="bf16 autocast on CUDA; fp8: DeepSeek's recipe",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default 300)")
    length.add_argument("--tokens", type=int, help="training tokens (steps = tokens / (batch * seq-len))")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument(
        "--gamma", type=float, default=1e-3, help="bias update speed of auxiliary-loss-free balancing (0: off)"
    )
    p.add_argument("--alpha", type=float, default=1e-4, help="sequence-wise balance loss weight (0: off)")
    p.add_argument("--mtp-lambda", type=float, default=0.3, help="MTP loss weight")
    p.add_argument(
        "--fp8-granularity", choices=("block", "tensor"), default="block", help="1x128 / 128x128 scales, or per tensor"
    )
    p.add_argument("--pow2-scales", action="store_true", help="round FP8 scales up to powers of two")
    p.add_argument(
        "--no-compile", action="store_true", help="quantize eagerly on CUDA (not as Triton kernels or torch.compile)"
    )
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=100, help="steps between saved training states")
    p.add_argument("--save-dtype", choices=("bf16", "fp32"), default="bf16", help="checkpoint weight dtype")
    p.add_argument(
        "--shard-mb", type=int, default=5000, help="largest safetensors shard, MB (Hugging Face's default 5 GB)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--ep",
        type=int,
        default=0,
        metavar="N",
        help="expert parallelism over N ranks: torchrun --nproc-per-node N -m dsv3c train ... --ep N (rank 0 writes)",
    )
    p.add_argument("--ep-timeout", type=float, default=300.0, metavar="S", help="with --ep: seconds to wait for a peer")


def run(args: argparse.Namespace) -> int:
    if args.prepare is not None:
        return _prepare(args)
    if args.data is None or args.out is None or (args.preset is None and args.config is None):
        raise UserError("train needs --data DIR, --out DIR and --preset NAME or --config FILE (or --prepare DIR)")
    from dsv3c.train.config import TrainConfig, model_config
    from dsv3c.train.corpus import load_corpus
    from dsv3c.train.loop import resolve_device, train_model

    config = model_config(args.preset, args.config)
    resolve_device(args.device)  # a missing device or resume state fails before any tokenizing
    if args.resume and not (args.out / "train_state" / "state.json").is_file():
        raise UserError(f"--resume: {args.out}/train_state has no saved training state; start without --resume")
    parallel, out = _expert_parallel(args) if args.ep else (None, args.out)
    if not args.resume and out == args.out:
        from dsv3c.artifact.atomic import check_output

        check_output(args.out, inputs=[args.data], force=args.force)  # replaces only a folder dsv3c wrote
        if args.out.exists():
            import shutil

            shutil.rmtree(args.out)
    steps = args.steps if args.steps is not None else 300
    if args.tokens is not None:
        steps = max(1, args.tokens // (args.batch_size * args.seq_len))
    train = TrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        precision=args.precision,
        device=args.device,
        lr=args.lr,
        warmup_steps=min(args.warmup_steps, steps),
        mtp_lambda=args.mtp_lambda,
        balance_alpha=args.alpha,
        bias_gamma=args.gamma,
        fp8_granularity=args.fp8_granularity,
        fp8_pow2=args.pow2_scales,
        fp8_compile=not args.no_compile,
        val_every=min(args.val_every, steps),
        save_every=args.save_every,
    )
    train.check()
    if parallel is not None and not parallel.is_primary:
        parallel.barrier()  # --ep: rank 0 tokenizes first, the others then read its cache
    corpus = load_corpus(args.data, cache_dir=args.cache_dir, vocab_size=args.vocab_size, log=_stderr)
    if parallel is not None and parallel.is_primary:
        parallel.barrier()
    with _Progress(steps, args.quiet or (parallel is not None and not parallel.is_primary)) as progress:
        result = train_model(
            config,
            corpus,
            out,
            train,
            resume=args.resume,
            progress=progress.update,
            save_dtype=args.save_dtype,
            max_shard_bytes=args.shard_mb * 1_000_000,
            parallel=parallel,
        )
    if parallel is not None:
        parallel.close()
        if not parallel.is_primary:
            import shutil

            shutil.rmtree(out.parent, ignore_errors=True)  # this rank's scratch logs
            return 0
    loss, val = result.final.get("lm_loss", float("nan")), result.final.get("val_loss", float("nan"))
    print(f"wrote {args.out}: {result.steps} steps, {result.tokens:,} tokens, loss {loss:.3f}, val {val:.3f}")
    return 0


def _expert_parallel(args: argparse.Namespace) -> tuple[Any, Path]:
    """--ep: join the ranks; rank 0 writes --out, the others write their logs to a scratch folder."""
    import tempfile

    from dsv3c.parallel.group import join
    from dsv3c.parallel.training import ExpertParallelTraining

    if args.resume or args.precision == "fp8":
        raise UserError("--ep trains in fp32 or bf16 from scratch: --resume and --precision fp8 do not combine with it")
    parallel = ExpertParallelTraining(
        join(args.ep, "cuda" if args.device.startswith("cuda") else "cpu", args.ep_timeout)
    )
    if parallel.is_primary:
        return parallel, args.out
    return parallel, Path(tempfile.mkdtemp(prefix=f"dsv3c-train-rank{parallel.group.rank}-")) / "out"


def _prepare(args: argparse.Namespace) -> int:
    from dsv3c.train.corpus import prepare_corpus

    packages = tuple(p for p in args.packages.split(",") if p)
    record = prepare_corpus(args.prepare, packages, args.vocab_size)
    text = ", ".join(f"{s['package']} {s['version']}" for s in record["sources"])
    print(
        f"wrote {args.prepare}: {record['files']} files from {text}, sha256 {record['sha256'][:16]}..., tokenizer.json"
    )
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class _Progress:
    """The progress bar (dsv3c.progress: shown on a terminal) with loss, validation loss, MTP loss, tokens/s, load."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet = total, quiet
        self.val = float("nan")
        self._context: Any = None
        self._task_context: Any = None
        self.task: Any = None
        self._done = 0

    def __enter__(self) -> _Progress:
        from dsv3c import progress

        self._context = progress.quiet() if self.quiet else contextlib.nullcontext()
        self._context.__enter__()
        self._task_context = progress.task("training", total=self.total)
        self.task = self._task_context.__enter__()
        return self

    def update(self, step: int, row: dict[str, float]) -> None:
        self.val = row.get("val_loss", self.val)
        info = (
            f"training: loss {row['lm_loss']:.3f} val {self.val:.3f} mtp {row.get('mtp_loss', float('nan')):.3f} "
            f"{row['tokens_per_s']:,.0f} tok/s load {row.get('load_max_mean', float('nan')):.2f}"
        )
        self.task.update(description=info)
        self.task.advance(step - self._done)
        self._done = step

    def __exit__(self, *exc: Any) -> None:
        self._task_context.__exit__(*exc)
        self._context.__exit__(*exc)
