"""Text prompts through tokenizer.json, and random weights filled into a --weights none export."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from dsv3c.cli.main import main
from dsv3c.errors import UserError
from dsv3c.runtime.generate import generate
from dsv3c.runtime.ort_backend import OrtBackend
from dsv3c.runtime.random_weights import fill_random


def without_weights(export: Path, folder: Path) -> Path:
    shutil.copytree(export, folder)
    (folder / "weights.bin").unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["weights"] = "none"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_fill_random_makes_a_runnable_export(tiny_export: Path, tmp_path: Path) -> None:
    a, b = without_weights(tiny_export, tmp_path / "a"), without_weights(tiny_export, tmp_path / "b")
    assert fill_random(a, seed=3) == fill_random(b, seed=3) == (tiny_export / "weights.bin").stat().st_size
    digest = [hashlib.sha256((f / "weights.bin").read_bytes()).hexdigest() for f in (a, b)]
    assert digest[0] == digest[1]  # same seed, same bytes
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["weights"] == "random" and manifest["stages"][-1]["stage"] == "fill_random"
    tokens = generate(OrtBackend(a), [[1, 2, 3]], 4)
    assert len(tokens[0]) == 4
    with pytest.raises(UserError, match="already has weights"):
        fill_random(a)


def test_text_prompt_with_tokenizer_json(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    vocab = {f"w{i}": i for i in range(512)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    assert main(["generate", str(folder), "--prompt", "w5 w17 w301", "--max-new-tokens", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = generate(OrtBackend(folder), [[5, 17, 301]], 6)[0]
    assert result["ids"] == expected
    assert result["text"] == " ".join(f"w{i}" for i in expected)
