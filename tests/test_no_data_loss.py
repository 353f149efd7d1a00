"""No user data lost (issue 11.4), through the real CLI on tiny checkpoints.

An output that is, contains or lies inside an input is refused before anything is written (--force too);
--force replaces only what dsv3c wrote; reports are written to a temporary sibling and renamed; SIGINT
and SIGTERM leave no output and no traceback; a killed run leaves a hidden temporary that the next run
writing the same output removes.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dsv3c.cli import main as cli_main

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    def call(*args: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = cli_main.main([str(a) for a in args])
        except SystemExit as e:
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return call


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint folder from `dsv3c init --preset tiny`, its export)."""
    root = tmp_path_factory.mktemp("safe")
    assert cli_main.main(["init", "--preset", "tiny", "--out", str(root / "ckpt")]) == 0
    assert cli_main.main(["export", str(root / "ckpt"), "--out", str(root / "exp")]) == 0
    return root / "ckpt", root / "exp"


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def refused(result: tuple[int, str, str], words: str) -> None:
    code, _, err = result
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err, err


def test_export_onto_its_own_checkpoint_is_refused_force_or_not(made: tuple[Path, Path], cli: Cli) -> None:
    ckpt, _ = made
    before = fingerprint(ckpt)
    refused(cli("export", ckpt, "--out", ckpt, "--force"), "the output is the input")
    refused(cli("export", ckpt, "--out", ckpt / "sub", "--force"), "lies inside the input")
    refused(cli("export", ckpt, "--out", ckpt.parent, "--force"), "contains the input")
    assert fingerprint(ckpt) == before and not (ckpt / "sub").exists()
    assert hidden(ckpt.parent) == []


def test_every_command_refuses_an_output_overlapping_its_input(made: tuple[Path, Path], cli: Cli) -> None:
    _, exp = made
    before = fingerprint(exp)
    refused(cli("quantize", exp, "--out", exp, "--force"), "the output is the input")
    refused(cli("quantize", exp, "--out", exp / "q"), "lies inside the input")
    refused(cli("lower", exp, "--target", "portable", "--out", exp.parent, "--force"), "contains the input")
    refused(cli("build", exp, "--out", exp / "engines"), "lies inside the input")
    refused(cli("diff", exp / "prefill.onnx", exp / "decode.onnx", "--out", exp / "decode.onnx"), "is the input")
    assert fingerprint(exp) == before and hidden(exp) == [] and hidden(exp.parent) == []


def test_force_replaces_only_a_folder_dsv3c_wrote(made: tuple[Path, Path], cli: Cli, tmp_path: Path) -> None:
    ckpt, exp = made
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    refused(cli("export", ckpt, "--out", user, "--force"), "dsv3c did not write")
    refused(cli("init", "--preset", "tiny", "--out", user, "--force"), "dsv3c did not write")
    refused(cli("export", ckpt, "--out", user), "--force")
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"] and (user / "notes.txt").read_text() == "mine"
    shutil.copytree(exp, tmp_path / "exp")  # an export folder dsv3c wrote
    assert cli("init", "--preset", "tiny", "--config-only", "--out", tmp_path / "exp", "--force")[0] == 0
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == [".dsv3c", "config.json"]  # replaced
    assert cli("init", "--preset", "tiny", "--out", tmp_path / "ck", "--config-only")[0] == 0
    assert cli("init", "--preset", "tiny", "--out", tmp_path / "ck", "--config-only", "--force")[0] == 0
    assert hidden(tmp_path) == []


def test_reports_are_written_through_a_temporary_sibling(made: tuple[Path, Path], cli: Cli, tmp_path: Path) -> None:
    _, exp = made
    report = tmp_path / "report.txt"
    report.write_text("old report")
    code, out, _ = cli("diff", exp / "prefill.onnx", exp / "decode.onnx", "--out", report)
    assert code == 1 and "wrote" in out and report.read_text() != "old report"
    assert hidden(tmp_path) == []
    refused(cli("diff", exp / "prefill.onnx", exp / "decode.onnx", "--out", tmp_path), "is a folder")


def _default_signals() -> None:
    """The child gets SIGINT and SIGTERM's default dispositions: a suite started in the background (`make test &`)
    runs with SIGINT ignored, and dsv3c rightly keeps a signal its caller ignores ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _start_long_export(out: Path) -> subprocess.Popen[str]:
    """`dsv3c export --preset v3 --weights none`: the 671B topology, about 20 s: long enough to interrupt."""
    command = [sys.executable, "-m", "dsv3c", "export", "--preset", "v3", "--weights", "none", "--out", str(out)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals
    )
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f".{out.name}.*.partial")):  # the temporary folder: writing has begun
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    return process


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_leaves_no_output_and_no_traceback(tmp_path: Path, sig: int, code: int, word: str) -> None:
    process = _start_long_export(tmp_path / "out")
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert word in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_a_killed_run_leaves_a_hidden_temporary_the_next_run_removes(cli: Cli, tmp_path: Path) -> None:
    process = _start_long_export(tmp_path / "out")
    process.kill()
    process.communicate(timeout=60)
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".out.") and left[0].name.endswith(".partial")
    assert cli("init", "--preset", "tiny", "--config-only", "--out", tmp_path / "out")[0] == 0  # the next run
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
