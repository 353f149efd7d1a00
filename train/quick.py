"""A small trained model in under a minute on CPU, for tests that need a model that has learned something.

`quick_tiny(folder)` takes ~1.5 MB of the Python documentation's reStructuredText sources (Debian's
python3.11-doc), trains a 512-token BPE on them and then the `quick` preset (2 layers, 8 routed experts,
MTP depth 1) for a few hundred steps, and returns the checkpoint folder. A second call with the same
arguments returns the folder as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from dsv3c.errors import UserError
from dsv3c.train.config import Precision, TrainConfig, model_config
from dsv3c.train.corpus import load_corpus

PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")


def small_text_folder(folder: Path, max_bytes: int = 1_500_000, source: Path = PYTHON_DOC_SOURCES) -> Path:
    """Copy the first .rst.txt files (sorted) of the Python docs into `folder`, up to max_bytes."""
    if not source.is_dir():
        raise UserError(f"{source} is missing: apt-get install python3.11-doc")
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for path in sorted(source.rglob("*.rst.txt")):
        if total >= max_bytes:
            break
        text = path.read_text(encoding="utf-8")
        (folder / str(path.relative_to(source)).replace("/", "__")).write_text(text, encoding="utf-8")
        total += len(text.encode())
    return folder


def quick_train_config(steps: int, precision: Precision, bias_gamma: float, seed: int) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=16,
        seq_len=64,
        lr=1e-2,
        warmup_steps=20,
        precision=precision,
        bias_gamma=bias_gamma,
        seed=seed,
        val_every=max(1, steps // 2),
        val_batches=4,
        log_every=10,
        save_every=steps,
    )


def quick_tiny(
    folder: Path, steps: int = 200, precision: Precision = "fp32", bias_gamma: float = 1e-2, seed: int = 0
) -> Path:
    """Train (or reuse) the quick model in folder/checkpoint; returns that checkpoint folder."""
    from dsv3c.train.loop import train_model

    folder = Path(folder)
    out = folder / "checkpoint"
    train = quick_train_config(steps, precision, bias_gamma, seed)
    record = out / "training.json"
    if record.is_file() and json.loads(record.read_text()).get("train") == json.loads(json.dumps(train.to_dict())):
        return out
    corpus = load_corpus(
        small_text_folder(folder / "text"), cache_dir=folder / "cache", vocab_size=512, log=lambda _: None
    )
    if out.exists():
        import shutil

        shutil.rmtree(out)
    train_model(model_config("quick", None), corpus, out, train, save_dtype="fp32")
    return out
