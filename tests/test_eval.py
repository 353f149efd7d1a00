"""dsv3c eval: the same loss from PyTorch and onnxruntime, the comparison fields, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from dsv3c.cli.main import main
from dsv3c.eval.metrics import evaluate
from dsv3c.eval.scorer import open_scorer
from dsv3c.eval.text import eval_windows
from dsv3c.eval.tokens import find_tokenizer
from dsv3c.models.config import DeepseekV3Config

from .conftest import random_model

REPO = Path(__file__).resolve().parent.parent


def train_tokenizer(text: str, vocab_size: int, path: Path) -> None:
    """A byte-level BPE on `text`, as a user's tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([text], trainer)
    tokenizer.save(str(path))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder
    from dsv3c.models.checkpoint import save_model

    root = tmp_path_factory.mktemp("eval")
    config = DeepseekV3Config.from_preset("tiny")
    save_model(random_model(config), root / "ckpt")
    text = (REPO / "README.md").read_text()
    train_tokenizer(text, config.vocab_size, root / "ckpt" / "tokenizer.json")
    (root / "data").mkdir()
    (root / "data" / "b.txt").write_text(text[len(text) // 2 :])
    (root / "data" / "a.txt").write_text(text[: len(text) // 2])
    export(from_folder(root / "ckpt"), root / "export", weights="checkpoint")
    return {"ckpt": root / "ckpt", "export": root / "export", "data": root / "data", "root": root}


def test_ort_loss_equals_torch_loss(folders: dict[str, Path]) -> None:
    torch_scorer = open_scorer(folders["ckpt"])
    ort_scorer = open_scorer(folders["export"])
    windows = eval_windows(folders["data"], find_tokenizer(folders["ckpt"]), 512, 64, 1024)
    assert windows.shape == (16, 64)
    result = evaluate(ort_scorer, windows, batch=3, reference=torch_scorer)  # 3: a ragged last batch
    assert result.tokens == 16 * 63 and result.runtime == "ort"
    assert result.comparison is not None
    assert abs(result.comparison.rel_loss_error) < 1e-5
    assert result.comparison.top1_agreement > 0.99
    assert result.comparison.kl_mean < 1e-6
    assert math.isclose(result.perplexity, math.exp(result.loss))
    alone = evaluate(torch_scorer, windows, batch=16)
    assert math.isclose(alone.loss, result.comparison.reference_loss, rel_tol=1e-7)  # batching changes only rounding


def test_cli_json(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", str(folders["export"]), "--data", str(folders["data"]), "--window", "32", "--max-tokens", "256"]
    assert main([*args, "--against", str(folders["ckpt"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 8 * 31 and out["windows"] == 8
    for key in ("loss", "perplexity", "rel_loss_error", "top1_agreement", "kl_mean", "reference_loss"):
        assert isinstance(out[key], float)
    assert main(args) == 0  # text; the export finds the tokenizer in the checkpoint it came from
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "missing.txt"], "no such file or folder"),
        (["--data", "binary"], "not UTF-8 text"),
        (["--data", "DATA", "--window", "4096"], "exceeds the model's max_position_embeddings"),
        (["--data", "DATA", "--max-tokens", "8", "--window", "16"], "smaller than one --window"),
        (["--data", "DATA", "--against", "nowhere"], "no such folder"),
        (["--data", "DATA", "--runtime", "ort"], "is a checkpoint folder"),
    ],
)
def test_bad_input_is_one_line(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    (folders["root"] / "binary").write_bytes(b"\xff\xfe\x00\x81" * 64)
    extra = [
        str(folders["data"]) if e == "DATA" else str(folders["root"] / e) if e in ("binary", "nowhere") else e
        for e in extra
    ]
    assert main(["eval", str(folders["ckpt"]), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_no_tokenizer(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dsv3c.models.checkpoint import save_model

    save_model(random_model(DeepseekV3Config.from_preset("tiny")), tmp_path / "bare")
    assert main(["eval", str(tmp_path / "bare"), "--data", str(folders["data"])]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
