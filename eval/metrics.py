"""Loss, perplexity and the comparison with a reference, accumulated window batch by window batch.

Token t of a window is predicted from tokens [0, t), so a window of W tokens scores W - 1 predictions.
Against a reference: relative loss error (loss - ref) / ref, top-1 agreement (the same argmax), and the
mean per-token KL(reference || model) in nats. Sums are kept in float64, so the order of batches does
not change the result beyond rounding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from dsv3c.errors import UserError
from dsv3c.eval.scorer import Scorer


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


def evaluate(scorer: Scorer, windows: np.ndarray, batch: int = 4, reference: Scorer | None = None) -> EvalResult:
    if reference is not None and reference.vocab_size != scorer.vocab_size:
        raise UserError(
            f"{scorer.folder} has a vocabulary of {scorer.vocab_size} and {reference.folder} one of "
            f"{reference.vocab_size}; --against needs the same vocabulary"
        )
    nll_sum = ref_sum = kl_sum = 0.0
    kl_max, agree, count = 0.0, 0, 0
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        ids = torch.from_numpy(chunk)
        logp, nll = token_nll(scorer.logits(chunk), ids)
        nll_sum += float(nll.sum())
        count += nll.numel()
        if reference is None:
            continue
        ref_logp, ref_nll = token_nll(reference.logits(chunk), ids)
        ref_sum += float(ref_nll.sum())
        agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [B, W-1]
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
    loss = nll_sum / count
    result = EvalResult(str(scorer.folder), scorer.runtime, loss, math.exp(loss), count, len(windows), windows.shape[1])
    if reference is not None:
        ref_loss = ref_sum / count
        result.comparison = Comparison(
            str(reference.folder), ref_loss, (loss - ref_loss) / ref_loss, agree / count, kl_sum / count, kl_max
        )
    return result


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
