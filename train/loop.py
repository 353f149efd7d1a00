"""One readable training loop over dsv3c.models: next-token + MTP loss, bias balancing, BF16 or FP8.

    loss = CE(main) + lambda / D * sum_k CE(MTP depth k) + alpha * sequence-wise balance loss

The MTP modules share the main embedding and output head while training (tied parameters; the
checkpoint stores them as copies in the usual layout). Master weights and AdamW state are float32;
CUDA runs under bf16 autocast; `fp8` additionally swaps the FP8 linears in (train/fp8_linear.py).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from dsv3c.errors import UserError
from dsv3c.models.checkpoint import init_random
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM, MTPModule
from dsv3c.train.balance import LoadTracker
from dsv3c.train.config import TrainConfig, config_hash
from dsv3c.train.corpus import Corpus
from dsv3c.train.data import WindowBatches
from dsv3c.train.fp8_experts import group_experts
from dsv3c.train.fp8_linear import Fp8Recipe, convert_to_fp8
from dsv3c.train.grouped_experts import group_experts as group_bf16_experts
from dsv3c.train.output import plot_curves, write_checkpoint
from dsv3c.train.state import STATE_DIR, load_state, save_state

METRICS_FILE = "metrics.jsonl"


class Parallel(Protocol):
    """A distributed run's changes to the loop (dsv3c.parallel.training.ExpertParallelTraining; the CLI passes it)."""

    def shard(self, model: DeepseekV3ForCausalLM) -> None: ...
    def clip_grad_norm_(self, model: DeepseekV3ForCausalLM, max_norm: float) -> torch.Tensor: ...
    def full_model(self, model: DeepseekV3ForCausalLM) -> DeepseekV3ForCausalLM | None: ...


@dataclass
class TrainResult:
    out: Path
    steps: int
    tokens: int
    final: dict[str, float] = field(default_factory=dict)  # last train / val losses, load, tokens/s
    metrics: list[dict[str, Any]] = field(default_factory=list)


def build_model(config: DeepseekV3Config, train: TrainConfig, device: torch.device) -> DeepseekV3ForCausalLM:
    """float32 master model with MTP tied to the main embedding and head; FP8 linears for fp8."""
    model = init_random(config, seed=train.seed).to(device)
    for mtp in model.mtp:
        assert isinstance(mtp, MTPModule)
        mtp.embed_tokens.weight = model.model.embed_tokens.weight
        head = mtp.shared_head["head"]
        assert isinstance(head, torch.nn.Linear)
        head.weight = model.lm_head.weight
    if train.precision == "fp8":
        recipe = Fp8Recipe(granularity=train.fp8_granularity, pow2=train.fp8_pow2, compile=train.fp8_compile)
        convert_to_fp8(model, recipe)
        group_experts(model, recipe)  # routed experts as grouped GEMMs (block granularity)
    elif train.precision == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0):
        group_bf16_experts(model)  # routed experts as grouped bf16 GEMMs (torch._grouped_mm's sm90 kernels)
    return model


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use cpu or cuda") from None


def lr_at(step: int, train: TrainConfig) -> float:
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, fused=fused)


def losses(model: DeepseekV3ForCausalLM, window: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """window [B, T + 1 + D] -> (main next-token CE, [CE of MTP depth k for k < D])."""
    ids = window[:, :seq_len]
    out = model(ids)
    main = F.cross_entropy(out.logits.float().flatten(0, 1), window[:, 1 : seq_len + 1].flatten())
    mtp, hidden = [], out.hidden_states
    for k in range(len(model.mtp)):
        next_ids = window[:, 1 + k : 1 + k + seq_len]  # token t+1+k at slot t
        logits, hidden, _ = model.forward_mtp(next_ids, hidden, depth=k)
        mtp.append(F.cross_entropy(logits.float().flatten(0, 1), window[:, 2 + k : 2 + k + seq_len].flatten()))
    return main, mtp


@torch.no_grad()
def evaluate(
    model: DeepseekV3ForCausalLM,
    batches: list[torch.Tensor],
    train: TrainConfig,
    tracker: LoadTracker,
    device: torch.device,
) -> dict[str, float]:
    model.eval()
    tracker.tracking = False
    main_sum, mtp_sum = 0.0, 0.0
    for window in batches:
        with _autocast(device, train):
            main, mtp = losses(model, window.to(device), train.seq_len)
        main_sum += float(main)
        mtp_sum += float(sum(mtp) / len(mtp)) if mtp else 0.0
    tracker.tracking = True
    model.train()
    result = {"val_loss": main_sum / len(batches)}
    if len(model.mtp):
        result["val_mtp_loss"] = mtp_sum / len(batches)
    return result


def _autocast(device: torch.device, train: TrainConfig) -> Any:
    enabled = device.type == "cuda" and train.precision in ("bf16", "fp8")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def train_model(
    model_config: DeepseekV3Config,
    corpus: Corpus,
    out: Path,
    train: TrainConfig,
    resume: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    save_dtype: str = "bf16",
    max_shard_bytes: int = 5_000_000_000,
    parallel: Parallel | None = None,
) -> TrainResult:
    """Train from scratch (or resume OUT's state); writes OUT as a checkpoint folder and returns the metrics."""
    train.check()
    device = resolve_device(train.device)
    if corpus.vocab_size > model_config.vocab_size or model_config.vocab_size != corpus.vocab_size:
        model_config = model_config.replace(vocab_size=corpus.vocab_size)
    torch.manual_seed(train.seed)
    model = build_model(model_config, train, device).train()
    if parallel is not None:
        parallel.shard(model)  # before the optimizer: it sees only this rank's parameters
    optimizer = make_optimizer(model, train)
    tracker = LoadTracker(model, train.balance_alpha)
    depth = len(model.mtp)
    data = WindowBatches(corpus.train, train.seq_len, depth, train.batch_size, train.seed)
    val = WindowBatches(corpus.val, train.seq_len, depth, train.batch_size, train.seed).fixed(train.val_batches)
    chash = config_hash(model_config, train)
    meta = {"config_hash": chash, "train": train.to_dict(), "corpus_sha256": corpus.origin.get("sha256")}
    metrics_path = out / METRICS_FILE
    start = 0
    if resume:
        start = load_state(out, model, optimizer, chash)
        metrics = [m for m in _read_metrics(metrics_path) if m["step"] <= start]
    else:
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not empty; choose another --out, pass --force, or --resume")
        out.mkdir(parents=True, exist_ok=True)
        metrics = []
    _write_metrics(metrics_path, metrics)
    tokens_per_step = train.batch_size * train.seq_len
    last_time, last_step = time.perf_counter(), start
    step = start
    for step in range(start, train.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, train)
        window = data.batch(step).to(device, non_blocking=True)
        tracker.batch_size = window.shape[0]
        with _autocast(device, train):
            main, mtp = losses(model, window, train.seq_len)
            loss = main + (train.mtp_lambda / depth) * torch.stack(mtp).sum() if mtp else main
            balance = tracker.take_loss()
            if balance is not None:
                loss = loss + balance
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if parallel is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        else:
            grad_norm = parallel.clip_grad_norm_(model, train.grad_clip)
        optimizer.step()
        load = tracker.step(train.bias_gamma)
        done = step + 1
        if done % train.log_every == 0 or done == train.steps or done % train.val_every == 0:
            now = time.perf_counter()
            row: dict[str, Any] = {"step": done, "tokens": done * tokens_per_step, "loss": float(loss.detach())}
            row.update(lm_loss=float(main.detach()), lr=lr_at(step, train), grad_norm=float(grad_norm), **load)
            if mtp:
                row["mtp_loss"] = float(torch.stack(mtp).detach().mean())
            if balance is not None:
                row["balance_loss"] = float(balance.detach())
            row["tokens_per_s"] = (done - last_step) * tokens_per_step / max(now - last_time, 1e-9)
            if done % train.val_every == 0 or done == train.steps:
                row.update(evaluate(model, val, train, tracker, device))
            metrics.append(row)
            _append_metric(metrics_path, row)
            if not math.isfinite(row["loss"]):  # every later step is NaN too: stop instead of training on
                raise UserError(
                    f"training diverged: loss {row['loss']} at step {done} ({train.precision}); the metrics so far "
                    f"are in {metrics_path}; lower --lr or raise --warmup-steps, or resume from the last saved state"
                )
            if progress is not None:
                progress(done, row)
            last_time, last_step = time.perf_counter(), done
        if done % train.save_every == 0 and done < train.steps and parallel is None:
            save_state(out, model, optimizer, done, meta)
    steps_done = max(step + 1, start) if train.steps > start else start
    if parallel is None:
        save_state(out, model, optimizer, steps_done, meta)
    else:  # rank 0 writes the whole model; a sharded run keeps no resumable state
        whole = parallel.full_model(model)
        if whole is None:
            return TrainResult(out, steps_done, steps_done * tokens_per_step, {}, metrics)
        model = whole
    final = {k: v for k, v in (metrics[-1] if metrics else {}).items() if isinstance(v, float | int)}
    record = {"corpus": corpus.origin, "train": train.to_dict(), "final": final, "steps": steps_done}
    write_checkpoint(out, model, corpus.tokenizer_path, record, dtype=save_dtype, max_shard_bytes=max_shard_bytes)
    plot_curves(metrics, out / "curves.png", f"{train.precision}, {steps_done} steps")
    return TrainResult(out, steps_done, steps_done * tokens_per_step, final, metrics)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():  # written as ASCII JSON
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            break  # a line cut by an interruption (or damaged): keep what came before
        numbers = isinstance(row, dict) and all(type(v) in (int, float) for v in row.values())
        if not numbers or type(row.get("step")) is not int or type(row.get("tokens")) is not int:
            break  # the loop writes numbers only, each row with its step and tokens (the curves plot them)
        rows.append(row)
    return rows


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _append_metric(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


__all__ = ["STATE_DIR", "TrainResult", "build_model", "evaluate", "losses", "train_model"]
