"""On a tiny CPU-trained model with two MTP modules: both depths' drafts are accepted, far more often than a
random model's, on PyTorch and onnxruntime, with output identical to greedy.

The model is the `quick` preset with num_nextn_predict_layers = 2, trained 200 steps on the quick model's
text (train/quick.py) and cached in the temp folder, keyed by the training and model code. Held-out text:
the Python docs' tutorial, which that training text does not include.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from dsv3c.eval.speedup import text_prompts
from dsv3c.eval.text import token_stream
from dsv3c.eval.tokens import find_tokenizer
from dsv3c.models.checkpoint import load_model
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import MTPModule
from dsv3c.runtime.engine import Engine, EngineBackend
from dsv3c.runtime.generate import generate
from dsv3c.runtime.ort_backend import OrtEngine
from dsv3c.runtime.speculative import SpecStats, generate_mtp
from dsv3c.runtime.torch_backend import TorchEngine

from .conftest import random_model
from .fixtures.threads import one_thread  # noqa: F401  (autouse: this module decodes on one thread)

STEPS = 200
# measured on 6 held-out prompts (PyTorch and onnxruntime alike): 63% of depth-0 drafts accepted, 72% of the
# depth-1 drafts reached (46% of all steps), 1.95 tokens per main-model call; a random model: 0% at both
# depths, and the trained model with module 1's weights replaced by random ones: 0% at depth 1
MIN_DEPTH0, MIN_DEPTH1 = 0.45, 0.45


def _cache_key() -> str:
    root = Path(__file__).resolve().parent.parent
    sources = sorted((root / "train").glob("*.py")) + sorted((root / "train" / "presets").glob("*.json"))
    sources.append(root / "models" / "deepseek_v3.py")
    return hashlib.sha256(b"".join(p.read_bytes() for p in sources) + str(STEPS).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def trained_chain() -> Path:
    """The checkpoint folder of the quick preset with 2 MTP modules, trained STEPS steps (fp32)."""
    from dsv3c.train.config import model_config
    from dsv3c.train.corpus import load_corpus
    from dsv3c.train.loop import train_model
    from dsv3c.train.quick import PYTHON_DOC_SOURCES, quick_train_config, small_text_folder

    if not PYTHON_DOC_SOURCES.is_dir():
        pytest.skip("needs Debian's python3.11-doc (apt-get install python3.11-doc)")
    folder = Path(tempfile.gettempdir()) / f"dsv3c-quick-mtp2-{_cache_key()}"
    out = folder / "checkpoint"
    if (out / "training.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    text = small_text_folder(folder / "text")
    corpus = load_corpus(text, cache_dir=folder / "cache", vocab_size=512, log=lambda _: None)
    config = DeepseekV3Config.from_dict({**model_config("quick", None).to_dict(), "num_nextn_predict_layers": 2})
    train_model(config, corpus, out, quick_train_config(STEPS, "fp32", 1e-2, 0), save_dtype="fp32")
    return out


@pytest.fixture(scope="module")
def prompts(trained_chain: Path) -> list[list[int]]:
    from dsv3c.train.quick import PYTHON_DOC_SOURCES

    ids = token_stream(PYTHON_DOC_SOURCES / "tutorial", find_tokenizer(trained_chain), 6 * 128)
    return text_prompts(ids, 6, 24, 128)


def _speculate(engine: Engine, prompts: list[list[int]]) -> SpecStats:
    greedy = generate(EngineBackend(engine), prompts, 24)
    drafted, stats = generate_mtp(engine, prompts, 24)
    assert drafted == greedy and stats.depth == 2
    return stats


def _share_through_depth1(stats: SpecStats) -> float:
    """Of all steps, the share that accepted both drafts."""
    return stats.accepted_at[1] / stats.reached[0]


def test_trained_chain_accepts_at_both_depths(trained_chain: Path, prompts: list[list[int]]) -> None:
    model = load_model(trained_chain)
    trained = _speculate(TorchEngine(model), prompts)
    rates = trained.acceptance_per_depth
    assert rates[0] > MIN_DEPTH0 and rates[1] > MIN_DEPTH1
    assert trained.tokens_per_call > 1.7
    untrained = _speculate(TorchEngine(random_model(model.config)), prompts)
    assert _share_through_depth1(trained) > _share_through_depth1(untrained) + 0.3
    # the depth-1 drafts come from module 1's training: with its own layers random, they fail
    module = model.mtp[1]
    assert isinstance(module, MTPModule)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in [*module.block.parameters(), *module.eh_proj.parameters()]:
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    mixed = _speculate(TorchEngine(model), prompts)
    assert mixed.acceptance_per_depth[0] > MIN_DEPTH0 and mixed.acceptance_per_depth[1] < 0.2


def test_trained_chain_on_ort(trained_chain: Path, prompts: list[list[int]], tmp_path: Path) -> None:
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder

    export(from_folder(trained_chain), tmp_path / "export", weights="checkpoint")
    ort = _speculate(OrtEngine(tmp_path / "export", threads=1), prompts)
    torch_stats = _speculate(TorchEngine(load_model(trained_chain)), prompts)
    assert ort.acceptance_per_depth[1] > MIN_DEPTH1
    assert ort.accepted_at == torch_stats.accepted_at  # the same drafts, so the same acceptance
