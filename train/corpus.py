"""Training text: a corpus built from offline Debian packages, or any folder of UTF-8 text files.

`prepare_corpus` extracts human-written text from installed Debian packages (the Python
documentation's reStructuredText sources, the GCIDE dictionary) into a folder of plain text files,
records each package's name, version and the sha256 of every source file and of the text written, and
trains a byte-level BPE tokenizer on it (`tokenizer.json`). `load_corpus` turns any folder of UTF-8
text files into token ids, cached under a key made of the files' contents and the tokenizer, so a
folder is tokenized once; the cache holds only .npy and .json (nothing is unpickled).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from dsv3c.artifact.atomic import atomic_folder, write_checkpoint_marker
from dsv3c.artifact.json_file import read_json_object
from dsv3c.errors import UserError

CORPUS_FILE = "corpus.json"  # origin of the text: packages, versions, sha256s
TOKENIZER_FILE = "tokenizer.json"
METADATA = {CORPUS_FILE, TOKENIZER_FILE}
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"  # ids 0 and 1, as the presets' bos/eos_token_id
DEFAULT_PACKAGES = ("python3.11-doc", "dict-gcide")
CHUNK_BYTES = 1 << 20  # the dictionary is split into ~1 MiB files at entry boundaries
_REBUILD_CACHE = "delete the token cache to tokenize again"


@dataclass(frozen=True)
class Corpus:
    """Token ids of one text folder, split into training and held-out parts, and where they came from."""

    train: np.ndarray  # uint16 or int32 [n_train]
    val: np.ndarray  # [n_val]
    tokenizer_path: Path
    origin: dict[str, Any]  # corpus.json when the folder has one, else the files and their sha256

    @property
    def vocab_size(self) -> int:
        """Read from tokenizer.json itself, so training needs no `tokenizers` import (the GPU image has none)."""
        vocab, added = self._tokenizer_ids()
        size = max([*vocab.values(), *added]) + 1
        largest = max((int(part.max()) for part in (self.train, self.val) if part.size), default=-1)
        if largest >= size:
            raise UserError(
                f"{self.tokenizer_path}: has {size} token ids, but the tokens use id {largest}; {_REBUILD_CACHE}"
            )
        return size

    @property
    def vocab(self) -> dict[str, int]:
        """tokenizer.json's model vocabulary (token -> id), without the added tokens."""
        return self._tokenizer_ids()[0]

    def _tokenizer_ids(self) -> tuple[dict[str, int], list[int]]:
        """(model.vocab, the added tokens' ids) of tokenizer.json: a one-line error for a file no tokenizer wrote."""
        data = read_json_object(self.tokenizer_path, _REBUILD_CACHE)
        model, added = data.get("model"), data.get("added_tokens", [])
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if not isinstance(vocab, dict) or not isinstance(added, list) or not all(isinstance(t, dict) for t in added):
            raise UserError(f"{self.tokenizer_path}: not a tokenizer (no model.vocab object); {_REBUILD_CACHE}")
        ids = [*vocab.values(), *(t.get("id") for t in added)]
        if not ids or not all(type(i) is int and 0 <= i < 2**31 for i in ids):
            raise UserError(f"{self.tokenizer_path}: token ids must be integers in [0, 2**31); {_REBUILD_CACHE}")
        return vocab, ids[len(vocab) :]


# ---- Debian packages -> text folder --------------------------------------------------------------


def _package_version(package: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}|${Version}", package], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise UserError("dpkg-query not found: --prepare reads installed Debian packages") from None
    status, _, version = out.stdout.partition("|")
    if out.returncode != 0 or "installed" not in status:
        raise UserError(f"Debian package {package} is not installed (apt-get install {package})")
    return version


def _package_files(package: str) -> list[Path]:
    out = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, check=False)
    return sorted(Path(line) for line in out.stdout.splitlines() if Path(line).is_file())


def _python_doc_texts(files: list[Path]) -> Iterator[tuple[str, Path, str]]:
    """The docs' reStructuredText sources (html/_sources/**/*.rst.txt), one text file each."""
    for path in files:
        if "/_sources/" in str(path) and path.name.endswith(".txt"):
            relative = str(path).split("/_sources/", 1)[1]
            yield relative, path, path.read_text(encoding="utf-8")


def _gcide_texts(files: list[Path]) -> Iterator[tuple[str, Path, str]]:
    """The dictionary (dictzip is gzip-compatible), split at entry boundaries into ~1 MiB files."""
    for path in files:
        if path.name.endswith(".dict.dz"):
            # a few stray cp1252 bytes in the 1913 text: replaced (U+FFFD) rather than guessed
            with gzip.open(path) as f:
                text = f.read().decode("utf-8", errors="replace")
            start, part = 0, 0
            while start < len(text):
                end = text.find("\n\n", start + CHUNK_BYTES)
                end = len(text) if end < 0 else end + 2
                yield f"{path.stem}-{part:03d}.txt", path, text[start:end]
                start, part = end, part + 1


EXTRACTORS: dict[str, Callable[[list[Path]], Iterator[tuple[str, Path, str]]]] = {
    "python3.11-doc": _python_doc_texts,
    "dict-gcide": _gcide_texts,
}


def prepare_corpus(out: Path, packages: tuple[str, ...] = DEFAULT_PACKAGES, vocab_size: int = 4096) -> dict[str, Any]:
    """Write OUT/<package>/*.txt, OUT/corpus.json (origin) and OUT/tokenizer.json; returns corpus.json."""
    unknown = [p for p in packages if p not in EXTRACTORS]
    if unknown:
        raise UserError(f"no text extractor for package(s) {', '.join(unknown)}; choose from {', '.join(EXTRACTORS)}")
    sources = []
    with atomic_folder(out) as tmp:
        for package in packages:
            version = _package_version(package)
            files = _package_files(package)
            source_sha: dict[str, str] = {}
            written = 0
            for name, origin, text in EXTRACTORS[package](files):
                if str(origin) not in source_sha:
                    source_sha[str(origin)] = _sha256_file(origin)
                target = tmp / package / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
                written += len(text.encode())
            if not written:
                raise UserError(f"package {package} {version} has no text files where expected")
            sources.append(
                {
                    "package": package,
                    "version": version,
                    "source_files": len(source_sha),
                    "source_sha256": _sha256_text("".join(f"{k} {v}\n" for k, v in sorted(source_sha.items()))),
                    "text_bytes": written,
                }
            )
        text_files = _text_files(tmp)
        record = {"sources": sources, "files": len(text_files), "sha256": _content_hash(tmp, text_files)}
        tokenizer = train_tokenizer(text_files, vocab_size)
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        record["tokenizer"] = {"kind": "byte-level BPE (tokenizers)", "vocab_size": tokenizer.get_vocab_size()}
        (tmp / CORPUS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        write_checkpoint_marker(tmp, "text corpus")
    return record


# ---- tokenizer -----------------------------------------------------------------------------------


def train_tokenizer(files: list[Path], vocab_size: int) -> Any:
    """A byte-level BPE trained on `files`, with BOS/EOS as ids 0 and 1."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise UserError("training a tokenizer needs the 'tokenizers' package (pip install tokenizers)") from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(f) for f in files], trainer)
    return tokenizer


# ---- any text folder -> token ids (cached) -------------------------------------------------------


def _text_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.name not in METADATA
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _content_hash(folder: Path, files: list[Path]) -> str:
    """sha256 over (relative path, sha256 of contents) of every text file: the corpus' identity."""
    return _sha256_text("".join(f"{f.relative_to(folder)} {_sha256_file(f)}\n" for f in files))


def default_cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dsv3c" / "corpus"


def load_corpus(
    folder: Path,
    cache_dir: Path | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.02,
    log: Callable[[str], None] = print,
) -> Corpus:
    """Token ids of every text file in `folder` (sorted, each followed by EOS), cached by content hash.

    The folder's own tokenizer.json is used when it has one; otherwise one is trained and cached.
    The held-out split takes every k-th block of 65,536 tokens (k = 1 / val_fraction), so it samples
    every part of the corpus.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"--data {folder}: no such folder (give a folder of UTF-8 text files, or make one with --prepare)"
        )
    if is_token_cache(folder):
        return _read_cache(folder, val_fraction)
    files = _text_files(folder)
    if not files:
        raise UserError(f"--data {folder}: no text files in it")
    own_tokenizer = folder / TOKENIZER_FILE
    key_parts = _content_hash(folder, files) + (
        _sha256_file(own_tokenizer) if own_tokenizer.is_file() else f"bpe{vocab_size}"
    )
    cache = (cache_dir or default_cache_dir()) / hashlib.sha256(key_parts.encode()).hexdigest()[:24]
    if not (cache / "tokens.npy").is_file():
        log(f"tokenizing {len(files)} files from {folder} into {cache}")
        _build_cache(folder, files, own_tokenizer, vocab_size, cache)
    return _read_cache(cache, val_fraction)


def is_token_cache(folder: Path) -> bool:
    """A folder load_corpus made: tokens.npy, tokenizer.json and corpus.json (it can be --data itself,
    e.g. on a machine without the `tokenizers` package)."""
    return all((folder / name).is_file() for name in ("tokens.npy", TOKENIZER_FILE, CORPUS_FILE))


def _read_cache(cache: Path, val_fraction: float) -> Corpus:
    try:
        tokens = np.load(cache / "tokens.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"token cache {cache} is unreadable ({e}); delete it to tokenize again") from None
    if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.int32) or (tokens.size and tokens.min() < 0):
        raise UserError(
            f"{cache / 'tokens.npy'}: not token ids (expected one row of uint16 or int32 >= 0, got "
            f"{tokens.dtype} {list(tokens.shape)}); {_REBUILD_CACHE}"
        )
    origin = read_json_object(cache / CORPUS_FILE, _REBUILD_CACHE)
    train, val = split_tokens(tokens, val_fraction)
    return Corpus(train, val, cache / TOKENIZER_FILE, origin)


def _build_cache(folder: Path, files: list[Path], own_tokenizer: Path, vocab_size: int, cache: Path) -> None:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("tokenizing --data needs the 'tokenizers' package (pip install tokenizers)") from None
    origin: dict[str, Any] = {
        "folder": str(folder.resolve()),
        "files": len(files),
        "sha256": _content_hash(folder, files),
    }
    fix = "remove it from --data or make the folder again with --prepare"
    if (folder / CORPUS_FILE).is_file():  # the origin record of a folder --prepare wrote; read before any work
        origin = {**read_json_object(folder / CORPUS_FILE, fix), "folder": str(folder.resolve())}
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"--data: {f} is not UTF-8 text; remove it or convert it") from None
    if own_tokenizer.is_file():
        read_json_object(own_tokenizer, fix)  # its bytes: one line, as for corpus.json
        try:
            tokenizer = Tokenizer.from_file(str(own_tokenizer))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot load
            why = str(e)[:200]
            raise UserError(f"{own_tokenizer}: not a tokenizer the tokenizers package loads ({why}); {fix}") from None
    else:
        tokenizer = train_tokenizer(files, vocab_size)
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        if eos is not None:
            ids.append(eos)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65536 else np.int32
    origin["tokens"] = len(ids)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(cache, overwrite=True) as tmp:
        write_checkpoint_marker(tmp, "token cache")
        np.save(tmp / "tokens.npy", np.asarray(ids, dtype=dtype), allow_pickle=False)
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        (tmp / CORPUS_FILE).write_text(json.dumps(origin, indent=2) + "\n")


def split_tokens(tokens: np.ndarray, val_fraction: float, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): every k-th block of `block` tokens is held out; small corpora use smaller blocks."""
    if not 0 < val_fraction < 0.5:
        raise UserError(f"validation fraction must be in (0, 0.5), got {val_fraction}")
    every = max(2, round(1 / val_fraction))
    block = min(block, max(256, len(tokens) // (4 * every)))
    n_blocks = len(tokens) // block
    if n_blocks < every:
        raise UserError(f"corpus of {len(tokens)} tokens is too small to hold out a validation split")
    blocks = tokens[: n_blocks * block].reshape(n_blocks, block)
    held = np.arange(n_blocks) % every == every // 2
    return blocks[~held].reshape(-1), blocks[held].reshape(-1)
