"""Expert parallelism fails in one line, never hangs: mismatched launches, dead, missing or stuck ranks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dsv3c.cli.main import main
from dsv3c.parallel.partition import partition_checkpoint

from .parallel_common import launch, one_thread  # noqa: F401 (autouse: one thread, as the ranks)


@pytest.fixture(scope="module")
def part2(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("parallel") / "part2"
    partition_checkpoint(tiny_checkpoint, 2, folder)
    return folder


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["generate", *argv, "--prompt-ids", "1,2,3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _torchrun_env(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def test_ep_without_torchrun(capsys, monkeypatch, tiny_checkpoint: Path) -> None:
    monkeypatch.delenv("RANK", raising=False)
    err = _cli_error(capsys, str(tiny_checkpoint), "--ep", "2")
    assert "torchrun --nproc-per-node 2" in err


def test_ep_must_be_positive(capsys, tiny_checkpoint: Path) -> None:
    assert "--ep must be at least 1" in _cli_error(capsys, str(tiny_checkpoint), "--ep", "-2")


def test_ep_2_with_4_processes(capsys, monkeypatch, tiny_checkpoint: Path) -> None:
    _torchrun_env(monkeypatch, 3, 4)
    err = _cli_error(capsys, str(tiny_checkpoint), "--ep", "2")
    assert "--ep 2, but 4 processes were started" in err


def test_partition_for_2_loaded_by_4(capsys, monkeypatch, part2: Path) -> None:
    _torchrun_env(monkeypatch, 0, 4)
    err = _cli_error(capsys, str(part2), "--ep", "4")
    assert "partitioned for --ep 2, but 4 ranks were started" in err


def test_partition_folder_without_ep(capsys, part2: Path) -> None:
    assert "torchrun --nproc-per-node 2" in _cli_error(capsys, str(part2))


def test_ep_needs_the_torch_runtime(capsys, monkeypatch, tiny_checkpoint: Path, tmp_path: Path) -> None:
    _torchrun_env(monkeypatch, 0, 2)
    assert "onnxruntime has no all-to-all" in _cli_error(capsys, str(tiny_checkpoint), "--ep", "2", "--runtime", "ort")
    export = tmp_path / "export"  # what marks an export folder; its graphs are never opened
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    assert "is an export folder" in _cli_error(capsys, str(export), "--ep", "2")


def test_a_rank_that_dies_mid_generation(part2: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    survivor, dead = launch(2, part2, tmp_path, die_rank=1, timeout=40)
    assert dead.exitcode == 3
    assert survivor.exitcode == 2
    assert survivor.error.count("\n") == 1, survivor.error
    assert "rank 0: the MoE" in survivor.error and "a peer rank died" in survivor.error
    assert time.monotonic() - start < 30  # noticed at once, not after the timeout


def test_a_rank_that_hangs(part2: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    (survivor,) = launch(2, part2, tmp_path, wait_for=[0], hang_rank=1, timeout=30.0, timeout_s=4.0)
    assert survivor.exitcode == 2
    assert "did not answer within 4 s" in survivor.error, survivor.error
    assert time.monotonic() - start < 25


def test_a_rank_that_never_starts(part2: Path, tmp_path: Path) -> None:
    (alone,) = launch(2, part2, tmp_path, started=[0], timeout=30.0, timeout_s=3.0)
    assert alone.exitcode == 2
    assert "the 2 ranks did not all join within 3 s" in alone.error, alone.error
