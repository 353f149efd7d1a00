from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM

try:  # the GPU machine's image has no hypothesis; its runs take only the non-property tests
    from hypothesis import settings
except ImportError:
    settings = None

# `make test` draws the same generated examples on every run, so a change is judged on them and not on the
# luck of the draw; a hunt for new failures draws fresh ones: DSV3C_HYPOTHESIS_EXPLORE=1 make test. (A fresh
# draw in CI once found a real bug, fixed with its regression test: errors.py folds line breaks.)
if settings is not None:
    settings.register_profile("repeatable", derandomize=True, database=None)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile("explore" if os.environ.get("DSV3C_HYPOTHESIS_EXPLORE") else "repeatable")


def random_model(config: DeepseekV3Config, seed: int = 0, std: float = 0.08) -> DeepseekV3ForCausalLM:
    """A model with weights large enough that routing and argmax are decisive."""
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
            elif name.endswith("e_score_correction_bias"):
                p.normal_(0.0, 0.1)
            else:
                p.uniform_(0.8, 1.2)  # norms
    return model


@pytest.fixture(scope="session")
def tiny_config() -> DeepseekV3Config:
    return DeepseekV3Config.from_preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config: DeepseekV3Config) -> DeepseekV3ForCausalLM:
    return random_model(tiny_config)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model: DeepseekV3ForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_model` saved as a checkpoint folder (fp32: loading it gives the same weights)."""
    from dsv3c.models.checkpoint import save_model

    folder = tmp_path_factory.mktemp("runtime") / "tiny-checkpoint"
    save_model(tiny_model, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint: Path) -> Path:
    """The export folder of `tiny_checkpoint`, with its weights (shared by the runtime tests)."""
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder

    folder = tiny_checkpoint.parent / "tiny-export"
    export(from_folder(tiny_checkpoint), folder, weights="checkpoint")
    return folder


def _quick_cache_key() -> str:
    """The trained quick model is reused across sessions until the training or model code changes."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    sources = sorted((root / "train").glob("*.py")) + sorted((root / "train" / "presets").glob("*.json"))
    sources.append(root / "models" / "deepseek_v3.py")
    return hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]


@pytest.fixture(scope="session")
def trained_quick() -> Path:
    """A checkpoint folder of the `quick` preset trained 200 steps on ~1.5 MB of the Python docs (fp32).

    Trained once (about 20 s on an idle 2-core CPU) and cached in the temp folder, keyed by the training
    code; its folder has tokenizer.json, generation_config.json, training.json (final losses) and
    metrics.jsonl. Skips when Debian's python3.11-doc is not installed.
    """
    import tempfile

    from dsv3c.train.quick import PYTHON_DOC_SOURCES, quick_tiny

    if not PYTHON_DOC_SOURCES.is_dir():
        pytest.skip("needs Debian's python3.11-doc (apt-get install python3.11-doc)")
    return quick_tiny(Path(tempfile.gettempdir()) / f"dsv3c-quick-{_quick_cache_key()}")
