"""Loss, perplexity and the comparison with a reference, accumulated window batch by window batch.

Token t of a window is predicted from tokens [0, t), so a window of W tokens scores W - 1 predictions.
Against a reference: relative loss error (loss - ref) / ref, top-1 agreement (the same argmax), and the
mean per-token KL(reference || model) in nats. Sums are kept in float64, so the order of batches does
not change the result beyond rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from dsv3c.errors import UserError
from dsv3c.eval.scorer import ScorerLike


@dataclass
class Comparison:
    reference: str
    reference_loss: float
    rel_loss_error: float
    top1_agreement: float
    kl_mean: float
    kl_max: float


@dataclass
class EvalResult:
    model: str
    runtime: str
    loss: float
    perplexity: float
    tokens: int  # predictions scored
    windows: int
    window: int
    comparison: Comparison | None = None

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out.pop("comparison")
        if self.comparison is not None:
            out.update(asdict(self.comparison))
        return out


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, W, V], ids [B, W] -> log-probs [B, W-1, V] (float64) and the targets' NLL [B, W-1]."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp, nll


class Tally:
    """Running sums for one model over the windows (float64), and its comparison with the reference."""

    def __init__(self, scorer: ScorerLike) -> None:
        self.scorer = scorer
        self.nll = self.ref_nll = self.kl = self.kl_max = 0.0
        self.agree = self.count = 0

    def add(
        self, ids: torch.Tensor, logp: torch.Tensor, nll: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor] | None
    ) -> None:
        self.nll += float(nll.sum())
        self.count += nll.numel()
        if ref is None:
            return
        ref_logp, ref_nll = ref
        self.ref_nll += float(ref_nll.sum())
        self.agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [B, W-1]
        self.kl += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))

    def result(self, windows: np.ndarray, reference: ScorerLike | None) -> EvalResult:
        loss = self.nll / self.count
        s = self.scorer
        result = EvalResult(str(s.folder), s.runtime, loss, math.exp(loss), self.count, len(windows), windows.shape[1])
        if reference is not None:
            ref_loss = self.ref_nll / self.count
            result.comparison = Comparison(
                str(reference.folder),
                ref_loss,
                (loss - ref_loss) / ref_loss,
                self.agree / self.count,
                self.kl / self.count,
                self.kl_max,
            )
        return result


def evaluate_many(
    scorers: Sequence[ScorerLike], windows: np.ndarray, batch: int = 4, reference: ScorerLike | None = None
) -> list[EvalResult]:
    """Every scorer over the same windows; the reference runs once per batch for all of them."""
    for scorer in scorers:
        if reference is not None and reference.vocab_size != scorer.vocab_size:
            raise UserError(
                f"{scorer.folder} has a vocabulary of {scorer.vocab_size} and {reference.folder} one of "
                f"{reference.vocab_size}; --against needs the same vocabulary"
            )
    tallies = [Tally(s) for s in scorers]
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        ids = torch.from_numpy(chunk)
        ref = token_nll(reference.logits(chunk), ids) if reference is not None else None
        for tally in tallies:
            logp, nll = token_nll(tally.scorer.logits(chunk), ids)
            tally.add(ids, logp, nll, ref)
    return [t.result(windows, reference) for t in tallies]


def evaluate(
    scorer: ScorerLike, windows: np.ndarray, batch: int = 4, reference: ScorerLike | None = None
) -> EvalResult:
    return evaluate_many([scorer], windows, batch, reference)[0]


def format_result(result: EvalResult) -> str:
    lines = [
        f"{result.model} ({result.runtime}): loss {result.loss:.5f}, perplexity {result.perplexity:.3f} "
        f"over {result.tokens} tokens ({result.windows} windows of {result.window})"
    ]
    c = result.comparison
    if c is not None:
        lines.append(
            f"against {c.reference}: loss {c.reference_loss:.5f}, relative loss error {c.rel_loss_error:+.3e}, "
            f"top-1 agreement {c.top1_agreement:.2%}, KL {c.kl_mean:.3e} nats/token (max {c.kl_max:.3e})"
        )
    return "\n".join(lines)
