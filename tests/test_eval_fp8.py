"""On the tiny CPU-trained model: DeepSeek's block FP8 (1x128 activation tiles) costs less loss than per-tensor FP8.

Measured with bench/fidelity.py on 4064 held-out tokens: block +0.024% relative loss (KL 1.12e-3),
per-tensor +0.032% (KL 1.22e-3). Both are far below the 0.25% goal; the model's hidden size (64) is below
one 128-block, so the weights are scaled alike and the difference is the per-token activation scales.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dsv3c.eval.metrics import evaluate_many
from dsv3c.eval.scorer import open_scorer
from dsv3c.eval.text import eval_windows
from dsv3c.eval.tokens import find_tokenizer
from dsv3c.passes.fp8_math import ActScheme, WeightScheme
from dsv3c.passes.pipelines import QuantizeOptions
from dsv3c.passes.quantize import quantize_folder


@pytest.fixture(scope="module")
def exports(trained_quick: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder

    root = tmp_path_factory.mktemp("fp8")
    export(from_folder(trained_quick), root / "export", weights="checkpoint")
    schemes = {"block": (WeightScheme.BLOCK, ActScheme.TILE), "tensor": (WeightScheme.TENSOR, ActScheme.TENSOR)}
    for name, (weights, acts) in schemes.items():
        quantize_folder(root / "export", root / name, QuantizeOptions(weights=weights, activations=acts))
    return {"export": root / "export", "block": root / "block", "tensor": root / "tensor"}


def test_block_fp8_costs_less_than_per_tensor(trained_quick: Path, exports: dict[str, Path]) -> None:
    from dsv3c.train.quick import PYTHON_DOC_SOURCES

    windows = eval_windows(PYTHON_DOC_SOURCES / "tutorial", find_tokenizer(trained_quick), 512, 128, 4096)
    reference = open_scorer(trained_quick)
    block, tensor = evaluate_many(
        [open_scorer(exports["block"]), open_scorer(exports["tensor"])], windows, 4, reference
    )
    assert block.comparison is not None and tensor.comparison is not None
    assert 0 < block.comparison.kl_mean < tensor.comparison.kl_mean
    assert abs(block.comparison.rel_loss_error) < abs(tensor.comparison.rel_loss_error)
    assert abs(block.comparison.rel_loss_error) < 2.5e-3  # the goal: within 0.25% of the reference
