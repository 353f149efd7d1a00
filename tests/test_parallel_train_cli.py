"""dsv3c train --ep 2 on gloo: the losses, gradient norms and weights of one process."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from dsv3c.cli.main import main
from safetensors.torch import load_file

from .parallel_common import launch, one_thread  # noqa: F401 (autouse: one thread, as the ranks)
from .parallel_worker import cli_rank_main

WORDS = [
    "the",
    "model",
    "routes",
    "each",
    "token",
    "to",
    "its",
    "experts",
    "and",
    "adds",
    "their",
    "outputs",
    "weighted",
    "by",
    "the",
    "gate",
]


def _text(folder: Path) -> Path:
    rng = random.Random(0)
    folder.mkdir()
    for i in range(4):
        lines = (" ".join(rng.choices(WORDS, k=12)) + "." for _ in range(400))
        (folder / f"part{i}.txt").write_text("\n".join(lines) + "\n")
    return folder


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_ep2_matches_one_process(tmp_path: Path) -> None:
    data, cache = _text(tmp_path / "text"), tmp_path / "cache"
    common = ["train", "--preset", "tiny", "--data", str(data), "--cache-dir", str(cache), "--vocab-size", "300"]
    common += ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--precision", "fp32", "--val-every", "3"]
    common += ["--save-dtype", "fp32", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    argv = [*common, "--out", str(tmp_path / "ep2"), "--ep", "2", "--ep-timeout", "30"]
    results = launch(2, data, tmp_path, entry=cli_rank_main, argv=argv)
    assert [r.exitcode for r in results] == [0, 0], [r.error for r in results]
    one, ep2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "ep2")
    assert [m["step"] for m in ep2] == [m["step"] for m in one] == [3, 6]
    for a, b in zip(one, ep2, strict=True):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "val_loss", "load_max_mean"):
            assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    expected, got = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "ep2" / "model.safetensors")
    assert set(got) == set(expected)  # every expert, gathered to rank 0
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    assert not (tmp_path / "ep2" / "train_state").exists()  # a sharded run keeps no resumable state
