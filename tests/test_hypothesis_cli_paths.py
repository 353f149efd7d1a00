"""Paths on the command line, generated: an input or an output that is a name too long for the file system,
a symbolic-link loop, a dangling link, a path through a file, the user's own file or folder. Every command
answers with one line and exit code 2 (never a traceback), writes nothing, and the user's files survive,
`--force` included."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from dsv3c.artifact.atomic import atomic_folder, check_output
from dsv3c.cli import main as cli_main
from dsv3c.errors import UserError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CHECKPOINT = "the-checkpoint"  # the one valid input; a drawn name never equals it (filtered below)
LONG = "n" * 300  # longer than any file system's name limit (255 bytes)


@pytest.fixture(scope="module")
def root() -> Path:
    """A folder holding a tiny checkpoint and the user's own things that no command may touch."""
    from dsv3c.models.checkpoint import init_random, save_model
    from dsv3c.models.config import DeepseekV3Config

    folder = Path(tempfile.mkdtemp(prefix="dsv3c-paths-"))
    save_model(init_random(DeepseekV3Config.from_preset("tiny"), seed=0), folder / CHECKPOINT)
    (folder / "notes.txt").write_text("the user's notes\n")
    (folder / "user").mkdir()
    (folder / "user" / "keep.txt").write_text("keep me\n")
    os.symlink("loop", folder / "loop")  # a link to itself
    os.symlink("nowhere", folder / "dangling")
    return folder


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (links not followed) with its contents' hash: what a failed command must keep."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def cli(*args: str | Path) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli_main.main([str(a) for a in args])
        except SystemExit as e:
            code = int(e.code or 0)
    return code, err.getvalue()


HOSTILE = ["LONG", "LONG/x", "loop", "loop/x", "dangling", "notes.txt", "notes.txt/x", "user"]
names = st.sampled_from(HOSTILE) | st.text(max_size=12).filter(lambda s: not s.startswith("/") and s != CHECKPOINT)

# each takes (root, path) and names the path as the command's input (they never get as far as work)
INPUTS: dict[str, Callable[[Path, Path], list[str | Path]]] = {
    "export": lambda r, p: ["export", p, "--out", r / "o", "--weights", "none"],
    "quantize": lambda r, p: ["quantize", p, "--out", r / "o"],
    "lower": lambda r, p: ["lower", p, "--target", "portable", "--out", r / "o"],
    "build": lambda r, p: ["build", p, "--out", r / "o"],
    "inspect": lambda r, p: ["inspect", p],
    "diff": lambda r, p: ["diff", p, r / CHECKPOINT],
    "generate": lambda r, p: ["generate", p, "--prompt-ids", "1", "--max-new-tokens", "1"],
    "eval": lambda r, p: ["eval", p, "--data", r / "notes.txt"],
    "eval --data": lambda r, p: ["eval", r / CHECKPOINT, "--data", p],
    "partition": lambda r, p: ["partition", p, "--ep", "2", "--out", r / "o"],
    "train --config": lambda r, p: ["train", "--config", p, "--data", r / "user", "--out", r / "o"],
}
# ... and as the command's output, with --force: an existing thing that is not dsv3c's own folder
OUTPUTS: dict[str, Callable[[Path, Path], list[str | Path]]] = {
    "init": lambda r, p: ["init", "--preset", "tiny", "--out", p, "--force"],
    "init --config-only": lambda r, p: ["init", "--preset", "tiny", "--config-only", "--out", p, "--force"],
    "export": lambda r, p: ["export", r / CHECKPOINT, "--out", p, "--weights", "none", "--force"],
    "quantize": lambda r, p: ["quantize", r / CHECKPOINT, "--out", p, "--force"],
    "lower": lambda r, p: ["lower", r / CHECKPOINT, "--target", "portable", "--out", p, "--force"],
    "lower --dump-dir": lambda r, p: ["lower", r / CHECKPOINT, "--target", "ort", "--out", r / "o", "--dump-dir", p],
    "build": lambda r, p: ["build", r / CHECKPOINT, "--out", p, "--force"],
    "partition": lambda r, p: ["partition", r / CHECKPOINT, "--ep", "2", "--out", p, "--force"],
    "diff --out": lambda r, p: ["diff", r / CHECKPOINT, r / CHECKPOINT, "--out", p],
}


def _path(root: Path, name: str) -> Path:
    return root / name.replace("LONG", LONG)


def _refused_with_one_line(root: Path, argv: list[str | Path]) -> str:
    before = _snapshot(root)
    code, err = cli(*argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (argv, err)
    assert _snapshot(root) == before  # nothing written, nothing removed: the user's files are intact
    return lines[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(sorted(INPUTS)), name=names)
def test_a_bad_input_path_is_one_line(root: Path, command: str, name: str) -> None:
    _refused_with_one_line(root, INPUTS[command](root, _path(root, name)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(sorted(OUTPUTS)), name=st.sampled_from(HOSTILE))
def test_a_bad_output_path_is_one_line_and_keeps_the_users_files(root: Path, command: str, name: str) -> None:
    _refused_with_one_line(root, OUTPUTS[command](root, _path(root, name)))


# ---- regression tests: each failed before its fix ----------------------------------------------------------


@pytest.mark.parametrize("command", ["export", "partition", "quantize", "lower", "build"])
def test_force_never_replaces_a_file_with_a_folder(root: Path, command: str) -> None:
    """Found by probing --force on the user's own files: `export CKPT --out notes.txt --force` (and partition)
    deleted notes.txt and wrote an export folder in its place."""
    line = _refused_with_one_line(root, OUTPUTS[command](root, root / "notes.txt"))
    assert "is a file, not a folder dsv3c wrote" in line
    assert (root / "notes.txt").read_text() == "the user's notes\n"


def test_folder_outputs_refuse_a_file_even_with_force(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(UserError, match="is a file"):
        check_output(notes, force=True)
    with pytest.raises(UserError, match="is a file"), atomic_folder(notes, force=True):
        pass
    assert notes.read_text() == "mine"


@pytest.mark.parametrize("name", ["LONG", "LONG/x", "loop", "loop/x"])
@pytest.mark.parametrize(
    ("table", "command"), [(INPUTS, "export"), (INPUTS, "inspect"), (OUTPUTS, "init"), (OUTPUTS, "diff --out")]
)
def test_a_path_the_file_system_cannot_look_up_is_one_line(
    root: Path, table: dict[str, Callable[[Path, Path], list[str | Path]]], command: str, name: str
) -> None:
    """Found by probing: a name over 255 bytes raised OSError (ENAMETOOLONG) from Path.exists(), and a link
    loop RuntimeError from Path.resolve(), as tracebacks."""
    line = _refused_with_one_line(root, table[command](root, _path(root, name)))
    assert "not a usable path" in line and len(line) < 300
