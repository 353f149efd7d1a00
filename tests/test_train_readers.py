"""The files `dsv3c train` reads back from a user's folders: train_state/state.json (--resume), and a token
cache's corpus.json, tokenizer.json and tokens.npy (--data CACHE), plus the corpus.json of a text folder
--prepare wrote. Any bytes give a result or one UserError, never another exception; through the CLI,
exit code 2 and one line."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from dsv3c.cli.main import main
from dsv3c.errors import UserError
from dsv3c.train.corpus import CORPUS_FILE, TOKENIZER_FILE, load_corpus
from dsv3c.train.state import STATE_DIR, load_state, save_state
from hypothesis import given, settings
from hypothesis import strategies as st

from .test_hypothesis_user_files import contents, json_values

DEEP = b"[" * 50_000  # nested deeper than Python's JSON parser recurses
VOCAB = 16


def _one_line(e: UserError) -> str:
    assert "\n" not in str(e)
    return str(e)


# ---- train_state/state.json: load_state, as --resume calls it ---------------------------------------------


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT with a train_state/ as save_state writes it (after one optimizer step)."""
    out = tmp_path_factory.mktemp("state")
    model, optimizer = _model_and_optimizer()
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    save_state(out, model, optimizer, 7, {"config_hash": "h"})
    return out


def _resume(state: Path, meta: bytes | None = None, edit: dict | None = None) -> str | None:
    """load_state on a copy of `state` whose state.json is `meta` (or the saved one updated by `edit`):
    the UserError's message, or None when it loaded."""
    import shutil

    with tempfile.TemporaryDirectory(prefix="dsv3c-state-") as tmp:
        out = Path(tmp)
        shutil.copytree(state / STATE_DIR, out / STATE_DIR)
        path = out / STATE_DIR / "state.json"
        if edit is not None:
            meta = json.dumps({**json.loads(path.read_text()), **edit}).encode()
        if meta is not None:
            path.write_bytes(meta)
        model, optimizer = _model_and_optimizer()
        try:
            assert load_state(out, model, optimizer, "h") >= 0
        except UserError as e:
            return _one_line(e)
    return None


def test_the_saved_state_resumes(state: Path) -> None:
    assert _resume(state) is None


@settings(max_examples=150, deadline=None)
@given(data=contents)
def test_any_state_json_resumes_or_is_one_user_error(state: Path, data: bytes) -> None:
    _resume(state, data)


@settings(max_examples=100, deadline=None)
@given(edit=st.dictionaries(st.sampled_from(["step", "adam_steps", "config_hash"]), json_values, min_size=1))
def test_edited_state_fields_resume_or_are_one_user_error(state: Path, edit: dict) -> None:
    _resume(state, edit=edit)


@pytest.mark.parametrize(
    ("meta", "edit", "expected"),
    [
        (DEEP, None, "nested too deep"),  # was RecursionError
        (b"[1]", None, "expected a JSON object, got an array"),  # was TypeError
        (b'"step"', None, "expected a JSON object, got a string"),  # was TypeError
        (None, {"step": [7]}, "step must be an integer"),  # was TypeError from int()
        (None, {"step": 1e400}, "step must be an integer"),  # was OverflowError from int(inf)
        (None, {"step": 7.9}, "step must be an integer"),  # was silently step 7
        (None, {"step": -3}, "step must be an integer >= 0"),  # was silently resumed at step -3
        (None, {"adam_steps": []}, "adam_steps must be an object"),  # was AttributeError
        (None, {"adam_steps": {"weight": "x"}}, "must be a finite number"),  # was TypeError from torch.tensor
        (None, {"adam_steps": {"weight": float("nan")}}, "must be a finite number"),  # was a NaN AdamW step
    ],
)
def test_a_damaged_state_json_is_one_line(state: Path, meta: bytes | None, edit: dict | None, expected: str) -> None:
    message = _resume(state, meta, edit)
    assert message is not None and expected in message and "state.json" in message, message


def test_optimizer_moments_that_do_not_fit_are_one_line(state: Path, tmp_path: Path) -> None:
    """A moment of another shape was a RuntimeError at the first optimizer step after resuming."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(state / STATE_DIR, tmp_path / STATE_DIR)
    moments = load_file(str(tmp_path / STATE_DIR / "optimizer.safetensors"))
    moments["weight.exp_avg"] = torch.zeros(5, 5)
    del moments["bias.exp_avg_sq"]
    save_file(moments, str(tmp_path / STATE_DIR / "optimizer.safetensors"))
    with pytest.raises(UserError, match=r"optimizer state .* does not fit this model"):
        load_state(tmp_path, *_model_and_optimizer(), "h")


# ---- a token cache: corpus.json, tokenizer.json, tokens.npy ---------------------------------------------


def _tokenizer(vocab: int = VOCAB) -> dict:
    return {"model": {"vocab": {f"t{i}": i for i in range(2, vocab)}}, "added_tokens": [{"id": 0}, {"id": 1}]}


def _cache(folder: Path, corpus: bytes | None = None, tokenizer: bytes | None = None, tokens=None) -> Path:
    """A token cache as load_corpus writes it (ids 0..VOCAB-1, enough for a validation split)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "tokens.npy", np.arange(20_000, dtype=np.uint16) % VOCAB if tokens is None else tokens)
    (folder / TOKENIZER_FILE).write_bytes(json.dumps(_tokenizer()).encode() if tokenizer is None else tokenizer)
    (folder / CORPUS_FILE).write_bytes(b'{"sha256": "0", "tokens": 20000}' if corpus is None else corpus)
    return folder


def _read(**files) -> str | None:
    """load_corpus on a token cache with these files, and its vocab_size (as train reads both)."""
    with tempfile.TemporaryDirectory(prefix="dsv3c-cache-") as tmp:
        cache = _cache(Path(tmp) / "cache", **files)
        try:
            corpus = load_corpus(cache, log=lambda _: None)
            assert corpus.vocab_size > int(max(corpus.train.max(), corpus.val.max()))
            assert isinstance(corpus.origin, dict)
        except UserError as e:
            return _one_line(e)
    return None


def test_the_cache_as_written_reads() -> None:
    assert _read() is None


@settings(max_examples=150, deadline=None)
@given(which=st.sampled_from(["corpus", "tokenizer"]), data=contents)
def test_any_cache_json_reads_or_is_one_user_error(which: str, data: bytes) -> None:
    _read(**{which: data})


@settings(max_examples=60, deadline=None)
@given(vocab=json_values, added=json_values)
def test_edited_tokenizer_vocabularies_read_or_are_one_user_error(vocab, added) -> None:
    _read(tokenizer=json.dumps({"model": {"vocab": vocab}, "added_tokens": added}).encode())


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"corpus": DEEP}, "nested too deep"),  # was RecursionError
        ({"corpus": b"[]"}, "expected a JSON object"),  # was AttributeError in train (origin.get)
        ({"tokenizer": b"\xff\xfe{"}, "not UTF-8 text"),  # was UnicodeDecodeError
        ({"tokenizer": DEEP}, "nested too deep"),  # was RecursionError
        ({"tokenizer": b"{}"}, "not a tokenizer"),  # was KeyError
        ({"tokenizer": b'{"model": {"vocab": {}}}'}, "token ids must be"),  # was ValueError from max()
        ({"tokenizer": b'{"model": {"vocab": {"a": "0"}}}'}, "token ids must be"),  # was TypeError
        ({"tokenizer": json.dumps(_tokenizer(8)).encode()}, "the tokens use id 15"),  # was IndexError in training
        ({"tokens": np.zeros((20_000, 2), np.uint16)}, "not token ids"),  # was ValueError from a reshape
        ({"tokens": np.full(20_000, -1, np.int32)}, "not token ids"),  # was IndexError in training
    ],
)
def test_a_damaged_token_cache_is_one_line(files: dict, expected: str) -> None:
    message = _read(**files)
    assert message is not None and expected in message, message


def test_a_text_folders_corpus_json_is_one_line(tmp_path: Path) -> None:
    """A folder --prepare wrote keeps its corpus.json as the cache's origin; a damaged one was a
    JSONDecodeError (or TypeError for a non-object) after the whole folder had been tokenized."""
    pytest.importorskip("tokenizers")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello world " * 200)
    (tmp_path / "text" / CORPUS_FILE).write_text("[1, 2]")
    with pytest.raises(UserError, match=r"corpus\.json: expected a JSON object, got an array; remove it"):
        load_corpus(tmp_path / "text", cache_dir=tmp_path / "cache", vocab_size=300, log=lambda _: None)


def test_a_text_folders_tokenizer_json_is_one_line(tmp_path: Path) -> None:
    """A text folder's own tokenizer.json is loaded by the tokenizers package, which raised a bare Exception
    (a traceback) for one it could not load."""
    pytest.importorskip("tokenizers")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello world " * 200)
    for data, expected in [(b"{}", "not a tokenizer the tokenizers package loads"), (DEEP, "nested too deep")]:
        (tmp_path / "text" / TOKENIZER_FILE).write_bytes(data)
        with pytest.raises(UserError, match=expected) as e:
            load_corpus(tmp_path / "text", cache_dir=tmp_path / "cache", log=lambda _: None)
        assert "\n" not in str(e.value)


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(contents, max_size=4))
def test_any_metrics_file_keeps_its_whole_rows(lines: list[bytes]) -> None:
    """--resume keeps the rows of metrics.jsonl up to the first it cannot use (a line cut by an interruption):
    any bytes there (not UTF-8, nested too deep, not an object) were a traceback, or a KeyError after training."""
    from dsv3c.train.loop import METRICS_FILE, _read_metrics

    good = b'{"step": 1, "tokens": 32, "loss": 5.0, "lm_loss": 4.9}'
    with tempfile.TemporaryDirectory(prefix="dsv3c-metrics-") as tmp:
        path = Path(tmp) / METRICS_FILE
        path.write_bytes(b"\n".join([good, *lines]))
        rows = _read_metrics(path)
    assert rows[0] == json.loads(good)
    assert all(type(r["step"]) is int and type(r["tokens"]) is int for r in rows)


@pytest.mark.parametrize("bad", [b"\xff\xfe", DEEP, b"[1]", b'{"step": 2}', b'{"step": 2, "tokens": 64, "loss": "x"}'])
def test_a_damaged_metrics_row_ends_the_kept_rows(bad: bytes, tmp_path: Path) -> None:
    from dsv3c.train.loop import METRICS_FILE, _read_metrics

    good = b'{"step": 1, "tokens": 32, "loss": 5.0}'
    (tmp_path / METRICS_FILE).write_bytes(b"\n".join([good, bad, good]))
    assert _read_metrics(tmp_path / METRICS_FILE) == [json.loads(good)]


# ---- eval reads the same files: --data CACHE (held-out split) and a model's training.json -------------------


def test_eval_on_a_cache_with_a_damaged_tokenizer_is_one_line(tmp_path: Path) -> None:
    """eval --data CACHE compared the cache's tokenizer.json vocabulary with the model's: KeyError for {}."""
    from dsv3c.eval.text import heldout_stream

    class Tokenizer:  # the model's: only its vocabulary is compared
        def __init__(self, vocab: dict[str, int]):
            self.vocab = vocab

        def get_vocab(self, with_added_tokens: bool) -> dict[str, int]:
            return self.vocab

    ours = _tokenizer()["model"]["vocab"]
    assert len(heldout_stream(_cache(tmp_path / "good"), Tokenizer(ours), 64, 0.02)) == 64
    with pytest.raises(UserError, match="is not the model's"):
        heldout_stream(_cache(tmp_path / "other"), Tokenizer({**ours, "x": 99}), 64, 0.02)
    with pytest.raises(UserError, match="not a tokenizer"):
        heldout_stream(_cache(tmp_path / "cache", tokenizer=b"{}"), Tokenizer(ours), 64, 0.02)


@pytest.mark.parametrize("data", [DEEP, b"\xff\xfe{"])
def test_a_damaged_training_json_is_skipped_by_eval(tmp_path: Path, data: bytes) -> None:
    """eval reads the held-out fraction from a model's training.json, else the default; these bytes raised."""
    from dsv3c.eval.tokens import val_fraction

    (tmp_path / "training.json").write_bytes(data)
    assert val_fraction(tmp_path) == 0.02


# ---- through the CLI: exit code 2, one line ----------------------------------------------------------------


def _train(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(["train", "--preset", "quick", "--steps", "2", "--batch-size", "2", "--seq-len", "16", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("name", "data"), [(CORPUS_FILE, DEEP), (TOKENIZER_FILE, b"[]")])
def test_train_on_a_damaged_token_cache(tmp_path: Path, capsys, name: str, data: bytes) -> None:
    cache = _cache(tmp_path / "cache", **{"corpus" if name == CORPUS_FILE else "tokenizer": data})
    line = _train(capsys, "--data", str(cache), "--out", str(tmp_path / "out"))
    assert f"{cache / name}:" in line and "delete the token cache" in line, line


TRAINED = ["train", "--preset", "quick", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--save-every", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of one training step of the quick preset on a token cache, its state saved (--save-every 1)."""
    folder = tmp_path_factory.mktemp("trained")
    cache = _cache(folder / "cache")
    assert main([*TRAINED, "--data", str(cache), "--out", str(folder / "out"), "--quiet"]) == 0
    assert (folder / "out" / STATE_DIR / "state.json").is_file()
    return folder


@pytest.mark.parametrize("data", [DEEP, b"[7]", b'{"step": 1e400}'])
def test_train_resume_on_a_damaged_state(trained: Path, tmp_path: Path, capsys, data: bytes) -> None:
    import shutil

    shutil.copytree(trained / "out", tmp_path / "out")
    (tmp_path / "out" / STATE_DIR / "state.json").write_bytes(data)
    line = _train(capsys, "--data", str(trained / "cache"), "--out", str(tmp_path / "out"), "--resume")
    assert "state.json:" in line and "start without --resume" in line, line


def test_train_resume_with_damaged_metrics(trained: Path, tmp_path: Path, capsys) -> None:
    """A metrics.jsonl that is not UTF-8 was a UnicodeDecodeError traceback on --resume."""
    import shutil

    from dsv3c.train.loop import METRICS_FILE

    shutil.copytree(trained / "out", tmp_path / "out")
    metrics = tmp_path / "out" / METRICS_FILE
    metrics.write_bytes(metrics.read_bytes() + b"\xff\xfe[[[\n")
    out = ["--data", str(trained / "cache"), "--out", str(tmp_path / "out"), "--quiet", "--resume"]
    assert main([*TRAINED, *out]) == 0  # the same flags as the saved run (its config hash): nothing left to train
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1]
