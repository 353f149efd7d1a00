"""dsv3c train on CPU: a small model learns, its MTP drafts are accepted, balancing balances, resume resumes."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from dsv3c.cli.main import main
from dsv3c.errors import UserError
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3c.train.config import model_config
from dsv3c.train.corpus import load_corpus
from dsv3c.train.loop import losses, train_model
from dsv3c.train.quick import PYTHON_DOC_SOURCES, quick_train_config, small_text_folder

needs_docs = pytest.mark.skipif(not PYTHON_DOC_SOURCES.is_dir(), reason="needs Debian's python3.11-doc")


def _corpus(folder: Path):
    return load_corpus(folder / "text", cache_dir=folder / "cache", vocab_size=512, log=lambda _: None)


def _unigram_entropy(tokens: np.ndarray) -> float:
    counts = np.bincount(tokens.astype(np.int64)).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _val_windows(checkpoint: Path, n: int = 4) -> torch.Tensor:
    corpus = _corpus(checkpoint.parent)
    tokens = torch.from_numpy(corpus.val.astype(np.int64))
    return torch.stack([tokens[i * 64 : i * 64 + 66] for i in range(16 * n)])


@needs_docs
def test_trained_model_beats_unigram_and_its_loss_recomputes(trained_quick: Path) -> None:
    corpus = _corpus(trained_quick.parent)
    unigram = _unigram_entropy(corpus.train)
    record = json.loads((trained_quick / "training.json").read_text())
    assert record["final"]["val_loss"] < unigram - 1.0, (record["final"], unigram)
    # recompute the validation loss from the checkpoint alone, as the loop measured it
    model = DeepseekV3ForCausalLM.from_pretrained(str(trained_quick)).eval()
    windows = torch.from_numpy(corpus.val.astype(np.int64))
    val = [torch.stack([windows[(b * 16 + i) * 64 : (b * 16 + i) * 64 + 66] for i in range(16)]) for b in range(4)]
    with torch.no_grad():
        loss = sum(float(losses(model, w, 64)[0]) for w in val) / len(val)
    assert math.isclose(loss, record["final"]["val_loss"], rel_tol=1e-4), (loss, record["final"]["val_loss"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "curves.png"):
        assert (trained_quick / name).is_file(), name


def _mtp_acceptance(model: DeepseekV3ForCausalLM, windows: torch.Tensor) -> float:
    """How often the MTP draft for t+2 equals the main model's greedy token there (what greedy decoding accepts)."""
    with torch.no_grad():
        out = model(windows[:, :64])
        mtp_logits, _, _ = model.forward_mtp(windows[:, 1:65], out.hidden_states)
        main_next = model(windows[:, :65]).logits[:, 1:65].argmax(-1)  # main model's token t+2 given t+1
    return float((mtp_logits.argmax(-1) == main_next).float().mean())


@needs_docs
def test_mtp_drafts_accepted_far_more_than_a_random_models(trained_quick: Path) -> None:
    windows = _val_windows(trained_quick)
    trained = DeepseekV3ForCausalLM.from_pretrained(str(trained_quick)).eval()
    config = trained.config
    from dsv3c.models.checkpoint import init_random

    random_model = init_random(config, seed=1).eval()
    accepted, chance = _mtp_acceptance(trained, windows), _mtp_acceptance(random_model, windows)
    assert accepted > 0.2 and accepted > 5 * chance, (accepted, chance)


@needs_docs
def test_bias_balancing_lowers_expert_load(tmp_path: Path) -> None:
    small_text_folder(tmp_path / "text", max_bytes=400_000)
    corpus = _corpus(tmp_path)
    loads = {}
    for gamma in (0.0, 2e-2):
        cfg = dataclasses.replace(quick_train_config(40, "fp32", gamma, 0), balance_alpha=0.0)
        result = train_model(model_config("quick", None), corpus, tmp_path / f"g{gamma}", cfg, save_dtype="fp32")
        late = [m["load_max_mean"] for m in result.metrics if m["step"] > 10]
        loads[gamma] = sum(late) / len(late)
    assert loads[2e-2] < loads[0.0] - 0.1, loads


@needs_docs
def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    small_text_folder(tmp_path / "text", max_bytes=300_000)
    corpus = _corpus(tmp_path)
    cfg = dataclasses.replace(quick_train_config(20, "fp32", 1e-2, 0), save_every=10, log_every=5)
    config = model_config("quick", None)
    train_model(config, corpus, tmp_path / "straight", cfg, save_dtype="fp32")

    def interrupt(step: int, row: dict) -> None:
        if step == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_model(config, corpus, tmp_path / "resumed", cfg, progress=interrupt, save_dtype="fp32")
    result = train_model(config, corpus, tmp_path / "resumed", cfg, resume=True, save_dtype="fp32")
    assert [m["step"] for m in result.metrics] == [5, 10, 15, 20]
    a = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "straight")).state_dict()
    b = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "resumed")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "out" / "train_state").mkdir(parents=True)
    (tmp_path / "out" / "train_state" / "state.json").write_text("{not json")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello world " * 2000)
    cases = [
        (["--preset", "nope", "--data", str(tmp_path), "--out", str(tmp_path / "o")], "unknown preset"),
        (["--preset", "quick", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], "no text files"),
        (["--preset", "quick", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "no such folder"),
        (
            ["--preset", "quick", "--data", str(tmp_path / "text"), "--out", str(tmp_path / "o2"), "--resume"],
            "no saved training state",
        ),
    ]
    if not torch.cuda.is_available():
        cases.append(
            (
                ["--preset", "quick", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cuda"],
                "no CUDA",
            )
        )
    for argv, expected in cases:
        assert main(["train", *argv]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err


@needs_docs
def test_corrupt_resume_state_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small_text_folder(tmp_path / "text", max_bytes=200_000)
    argv = [
        "train",
        "--preset",
        "quick",
        "--data",
        str(tmp_path / "text"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--vocab-size",
        "512",
        "--quiet",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    (tmp_path / "out" / "train_state" / "model.safetensors").write_bytes(b"\x00" * 100)
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "unreadable" in err and err.count("\n") == 1, err


def test_a_diverged_run_stops_with_one_line(tmp_path: Path) -> None:
    """A NaN loss stops training at the next logged step (the H200's FP8 runs once logged 600 NaN steps)."""
    (tmp_path / "text").mkdir()
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 7))) for _ in range(40_000)]
    (tmp_path / "text" / "a.txt").write_text(" ".join(words))
    corpus = _corpus(tmp_path)
    cfg = dataclasses.replace(quick_train_config(30, "fp32", 0.0, 0), lr=1e30, warmup_steps=1, log_every=2)
    with pytest.raises(UserError, match=r"training diverged: loss nan at step (\d+)") as e:
        train_model(model_config("quick", None), corpus, tmp_path / "out", cfg, save_dtype="fp32")
    assert "\n" not in str(e.value)
    step = int(re.search(r"at step (\d+)", str(e.value)).group(1))  # type: ignore[union-attr]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert step < 30 and rows[-1]["step"] == step  # the diverged step is recorded, and nothing after it
