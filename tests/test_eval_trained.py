"""On the tiny CPU-trained model: onnxruntime's loss is PyTorch's, and MTP drafts are accepted, output = greedy.

Held-out text: the Python docs' tutorial, which the quick model's training text (the first ~1.5 MB of the
sorted sources) does not include.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dsv3c.eval.metrics import evaluate
from dsv3c.eval.scorer import open_scorer
from dsv3c.eval.speedup import text_prompts
from dsv3c.eval.text import eval_windows, token_stream
from dsv3c.eval.tokens import find_tokenizer
from dsv3c.runtime.engine import Engine, EngineBackend
from dsv3c.runtime.generate import generate
from dsv3c.runtime.loading import open_engine
from dsv3c.runtime.speculative import generate_mtp

# measured (bench/results/mtp_speedup_quick_cpu_*.json): 62% of drafts accepted on 8 held-out prompts;
# a random model's MTP head is accepted about 1% of the time
MIN_ACCEPTANCE = 0.45


@pytest.fixture(scope="module")
def heldout() -> Path:
    from dsv3c.train.quick import PYTHON_DOC_SOURCES

    return PYTHON_DOC_SOURCES / "tutorial"


@pytest.fixture(scope="module")
def trained_export(trained_quick: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder

    folder = tmp_path_factory.mktemp("trained") / "export"
    export(from_folder(trained_quick), folder, weights="checkpoint")
    return folder


def test_ort_loss_equals_torch_loss(trained_quick: Path, trained_export: Path, heldout: Path) -> None:
    tokenizer = find_tokenizer(trained_quick)
    windows = eval_windows(heldout, tokenizer, 512, 128, 2048)
    result = evaluate(open_scorer(trained_export), windows, 4, reference=open_scorer(trained_quick))
    assert result.comparison is not None
    assert abs(result.comparison.rel_loss_error) < 1e-5
    assert result.comparison.top1_agreement > 0.999
    assert result.loss < 0.8 * np.log(512)  # it learned: well below a uniform guess over the vocabulary


def _prompts(trained_quick: Path, heldout: Path) -> list[list[int]]:
    ids = token_stream(heldout, find_tokenizer(trained_quick), 6 * 128)
    return text_prompts(ids, 6, 24, 128)


def _check_mtp(engine: Engine, prompts: list[list[int]]) -> float:
    greedy = generate(EngineBackend(engine), prompts, 24)
    drafted, stats = generate_mtp(engine, prompts, 24)
    assert drafted == greedy
    return stats.acceptance_rate


def test_mtp_on_torch(trained_quick: Path, heldout: Path) -> None:
    assert _check_mtp(open_engine(trained_quick, "torch"), _prompts(trained_quick, heldout)) > MIN_ACCEPTANCE


def test_mtp_on_ort(trained_quick: Path, trained_export: Path, heldout: Path) -> None:
    assert _check_mtp(open_engine(trained_export, "ort"), _prompts(trained_quick, heldout)) > MIN_ACCEPTANCE
