"""Text prompts through tokenizer.json, and random weights filled into a --weights none export (float, and
an 8-bit lowering's: uniform bytes around the zero point, scales that give the float weights' std)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from dsv3c.cli.main import main
from dsv3c.errors import UserError
from dsv3c.runtime.generate import generate
from dsv3c.runtime.ort_backend import OrtBackend
from dsv3c.runtime.ort_cuda_graph import StaticDecoder
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


def test_fill_random_writes_8bit_weights_that_dequantize_to_the_float_std(tiny_export: Path, tmp_path: Path) -> None:
    canon = without_weights(tiny_export, tmp_path / "canon")
    lowered = tmp_path / "ort8"
    assert main(["lower", str(canon), "--target", "ort", "--weights-8bit", "--out", str(lowered)]) == 0
    fill_random(lowered, seed=1, std=0.02)
    decode = onnx.load(str(lowered / "decode.onnx"))  # external data read from the filled weights file
    init = {t.name: onnx.numpy_helper.to_array(t) for t in decode.graph.initializer}
    q8 = [n for n in init if n.endswith("_q8")]
    assert q8 and all(init[n].dtype == np.uint8 for n in q8)
    q = np.concatenate([init[n].ravel() for n in q8]).astype(np.float64) - 128
    scale = init[q8[0] + "_scales"].ravel()[0]
    assert abs(q.mean()) < 1.0 and abs((q * scale).std() - 0.02) < 0.002
    step = StaticDecoder(lowered, 1, 32, device="cpu", cuda_graph=False)
    logits = step.step(torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), 3, dtype=torch.long))
    assert torch.isfinite(logits).all()
