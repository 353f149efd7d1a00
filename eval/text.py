"""Held-out text -> fixed token windows: deterministic (sorted files, fixed cut), no randomness at all.

`--data` is a text file, a folder of them, or a training corpus folder (corpus.json + tokenizer.json, as
`dsv3c train` prepares it), whose held-out split is used: the same tokens training validated on.

Files are read in sorted path order and tokenized one by one until enough tokens are there; the token
stream is cut into consecutive windows of `window` tokens and the remainder dropped. Each window is scored
on its own (position 0 onward), so every runtime sees exactly the same inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from dsv3c.errors import UserError

CHARS_PER_TOKEN_BOUND = 16  # a BPE token rarely spans more characters: read this many per needed token


def text_files(path: Path) -> list[Path]:
    """The file itself, or every regular file under the folder (recursively), sorted by path."""
    if not path.exists():
        raise UserError(f"--data {path}: no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"--data {path}: the folder holds no files")
    return files


def _read(path: Path, limit: int) -> str:
    try:
        with path.open("r", encoding="utf-8") as f:
            return f.read(limit)
    except UnicodeDecodeError:
        raise UserError(f"--data {path}: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"--data {path}: cannot read ({e.strerror})") from None


def token_stream(path: Path, tokenizer: Any, needed: int) -> list[int]:
    """At least `needed` token ids from the text under `path` when it has that many, else all of them."""
    ids: list[int] = []
    for file in text_files(path):
        missing = needed - len(ids)
        if missing <= 0:
            break
        text = _read(file, missing * CHARS_PER_TOKEN_BOUND + 1024)
        if text.strip():
            ids.extend(tokenizer.encode(text).ids)
    return ids[:needed] if len(ids) > needed else ids


def windows(ids: list[int], window: int, count: int) -> np.ndarray:
    """[N, window] int64: the first `count` (at most) consecutive windows of the stream."""
    n = min(count, len(ids) // window)
    if n < 1:
        raise UserError(
            f"--data holds {len(ids)} tokens, fewer than one window of {window}; give more text or a --window"
        )
    return np.asarray(ids[: n * window], dtype=np.int64).reshape(n, window)


def is_corpus(path: Path) -> bool:
    """A training corpus folder (`dsv3c train --prepare`): text files with corpus.json and tokenizer.json."""
    return path.is_dir() and (path / "corpus.json").is_file() and (path / "tokenizer.json").is_file()


def heldout_stream(path: Path, tokenizer: Any, needed: int, val_fraction: float) -> list[int]:
    """The held-out split of a training corpus, exactly as training holds it out (train.corpus)."""
    from dsv3c.train.corpus import load_corpus

    corpus = load_corpus(path, val_fraction=val_fraction, log=lambda _: None)
    if corpus.vocab != tokenizer.get_vocab(with_added_tokens=False):
        raise UserError(f"--data {path}: the corpus's tokenizer.json is not the model's; its ids would mean other text")
    return corpus.val[:needed].astype(np.int64).tolist()


def eval_windows(
    path: Path, tokenizer: Any, vocab_size: int, window: int, max_tokens: int, val_fraction: float = 0.02
) -> np.ndarray:
    """Windows covering about `max_tokens` tokens of the text (at least one window); of a training
    corpus folder, its held-out split (`val_fraction` as in training)."""
    if window < 2:
        raise UserError(f"--window must be at least 2 tokens, got {window}")
    if max_tokens < window:
        raise UserError(f"--max-tokens {max_tokens} is smaller than one --window of {window}")
    count = max_tokens // window
    if is_corpus(path):
        ids = heldout_stream(path, tokenizer, count * window, val_fraction)
    else:
        ids = token_stream(path, tokenizer, count * window)
    batch = windows(ids, window, count)
    top = int(batch.max())
    if top >= vocab_size:
        raise UserError(f"the tokenizer produced id {top}, but the model's vocabulary has {vocab_size} entries")
    return batch
