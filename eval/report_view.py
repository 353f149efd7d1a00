"""The trained-model view of `quantize --report`: its measures on real text, and what they cost in loss.

The per-layer errors come from passes/report.py fed with token windows of the text; the loss delta is
dsv3c eval's measure (eval/metrics.py) of each candidate export against the unquantized export, both run
in onnxruntime on the same windows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dsv3c.eval.calibration import WINDOW, WINDOWS_PER_BATCH
from dsv3c.eval.metrics import evaluate_many
from dsv3c.eval.scorer import open_scorer

REPORT_BATCHES = 4  # of WINDOWS_PER_BATCH windows of WINDOW tokens: 1,024 tokens


def report_batches(export_dir: Path, data: Path) -> list[np.ndarray]:
    from dsv3c.eval.calibration import calibration_batches

    return calibration_batches(export_dir, data, REPORT_BATCHES)


def loss_deltas(reference: Path, candidates: dict[str, Path], batches: list[np.ndarray]) -> str:
    windows = np.concatenate(batches)
    results = evaluate_many(
        [open_scorer(f) for f in candidates.values()], windows, WINDOWS_PER_BATCH, open_scorer(reference)
    )
    lines = [f"loss on the text ({windows.shape[0]} windows of {WINDOW} tokens) vs the unquantized graph"]
    for name, r in zip(candidates, results, strict=True):
        assert r.comparison is not None
        c = r.comparison
        lines.append(
            f"  {name:<16} loss {r.loss:.5f} (reference {c.reference_loss:.5f}): relative {c.rel_loss_error:+.3e}, "
            f"top-1 agreement {c.top1_agreement:.2%}, KL {c.kl_mean:.3e} nats/token"
        )
    return "\n".join(lines)
