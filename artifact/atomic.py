"""Outputs appear whole or not at all, and never at the cost of the user's data.

Every folder and file dsv3c writes goes through `atomic_folder` or `atomic_file` (or `write_text`,
`write_bytes`): the output is written into a hidden temporary sibling (`.NAME.PID.XXXX.partial`) and
renamed into place at the end, so an interrupted or failed command leaves no output. The rules,
checked before anything is written:

- an output that is, contains or lies inside one of the command's inputs (or the reverse) is refused,
  `force` or not (`dsv3c export CKPT --out CKPT --force` must not replace the checkpoint);
- an existing output is replaced only with `force`, and a folder only when dsv3c wrote it (a dsv3c
  manifest: `manifest.json`, `engine_manifest.json` or the checkpoint marker `.dsv3c`), never an
  arbitrary folder of the user's, nor a file where a folder output goes;
- while the finished output is renamed into place, SIGINT and SIGTERM wait, so a signal never leaves
  the old output removed and the new one not yet in place;
- temporaries of a run that was killed (SIGKILL, power loss) are removed by the next run that writes the
  same output: their name holds the writer's process id, and only those of dead processes are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from dsv3c.errors import UserError

CHECKPOINT_MARKER = ".dsv3c"  # written into checkpoint folders dsv3c makes (they have no manifest)
_MANIFESTS = ("manifest.json", "engine_manifest.json", CHECKPOINT_MARKER)
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
__all__ = [
    "CHECKPOINT_MARKER",
    "atomic_file",
    "atomic_folder",
    "check_disjoint",
    "check_output",
    "is_dsv3c_folder",
    "remove_stale_temporaries",
    "write_bytes",
    "write_checkpoint_marker",
    "write_text",
]


def check_disjoint(output: Path, inputs: Iterable[Path | str | None]) -> None:
    """UserError when `output` is, contains or lies inside one of `inputs` (or the reverse)."""
    out = Path(output).resolve()
    for given in inputs:
        if given is None:
            continue
        inp = Path(given).resolve()
        if out == inp:
            how = "is"
        elif out.is_relative_to(inp):
            how = "lies inside"
        elif inp.is_relative_to(out):
            how = "contains"
        else:
            continue
        raise UserError(
            f"{output}: the output {how} the input {given}; the output must differ from every input and "
            "lie outside it, so nothing of the input is lost (--force does not change this)"
        )


def is_dsv3c_folder(folder: Path) -> bool:
    """Whether `folder` holds a dsv3c manifest (an export, an engine folder, or a checkpoint dsv3c wrote)."""
    for name in _MANIFESTS:
        try:
            raw = json.loads((Path(folder) / name).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            continue
        if isinstance(raw, dict) and ("dsv3c_version" in raw or raw.get("written_by") == "dsv3c"):
            return True
    return False


def write_checkpoint_marker(folder: Path, what: str) -> None:
    """Mark a checkpoint folder as written by dsv3c, so `--force` may replace it later."""
    text = json.dumps({"written_by": "dsv3c", "what": what}) + "\n"
    (Path(folder) / CHECKPOINT_MARKER).write_text(text)


def _check_replaceable(target: Path, force: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        return
    if not force:
        raise UserError(f"{target} already exists; choose another output or pass --force")
    if target.is_symlink():
        raise UserError(f"{target} is a symbolic link; dsv3c replaces only what it wrote, so remove it yourself")
    if not target.is_dir():  # dsv3c writes folders here, never a file: a file at this path is the user's
        raise UserError(
            f"{target} is a file, not a folder dsv3c wrote; --force replaces only dsv3c's own output folders, "
            "so choose another output or remove it yourself"
        )
    if not is_dsv3c_folder(target) and any(target.iterdir()):
        raise UserError(
            f"{target} is a folder dsv3c did not write (no dsv3c manifest); --force replaces only dsv3c's own "
            "outputs, so choose another output or remove it yourself"
        )


def _parent_of(target: Path) -> Path:
    parent = target.resolve().parent
    if not parent.is_dir():
        raise UserError(f"{target}: parent folder {parent} does not exist")
    return parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove temporaries beside `target` left by dsv3c runs that were killed; returns what was removed."""
    target = Path(target)
    parent = target.resolve().parent
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[^/]*\.(partial|old)$")
    removed = []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            m = pattern.match(entry.name)
            if m is None or int(m[1]) == os.getpid() or _alive(int(m[1])):
                continue  # not a temporary of ours, or one still being written
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (they are delivered right after it).

    Python handlers are swapped, not the signal mask: the mask is per thread, and a process-directed
    signal goes to any thread that does not block it (torch and onnxruntime start threads).
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread, where the CLI runs
        return
    pending: list[int] = []
    old = {s: signal.signal(s, lambda number, _frame: pending.append(number)) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for number in pending:
            signal.raise_signal(number)


def _remove(path: Path) -> None:
    with _signals_held():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _publish(tmp: Path, target: Path, parent: Path) -> None:
    with _signals_held():
        if target.exists() or target.is_symlink():
            old = parent / f".{target.name}.{os.getpid()}.replaced.old"
            _remove(old)
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)


def check_output(output: Path, inputs: Iterable[Path | str | None] = (), force: bool = False) -> None:
    """The checks `atomic_folder` makes, for a command to run first: a bad output fails before any work.

    UserError when `output` overlaps an input, its parent folder is missing, or it exists and may not be
    replaced (no `force`, or a folder dsv3c did not write).
    """
    output = Path(output)
    check_disjoint(output, inputs)
    _parent_of(output)
    _check_replaceable(output, force)


@contextlib.contextmanager
def atomic_folder(
    target: Path, force: bool = False, *, inputs: Iterable[Path | str | None] = (), overwrite: bool | None = None
) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`, on failure it is removed.

    `inputs`: the command's input paths (refused when they overlap `target`). `force`: replace an existing
    `target`, which must be a folder dsv3c wrote (or empty). `overwrite` is the old name of `force`.
    """
    target = Path(target)
    force = force or bool(overwrite)
    check_disjoint(target, inputs)
    parent = _parent_of(target)
    _check_replaceable(target, force)
    remove_stale_temporaries(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial", dir=parent))
    except OSError as e:
        raise UserError(f"{target}: cannot write in {parent} ({e.strerror})") from None
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes a private folder; an output is an ordinary one
        _publish(tmp, target, parent)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(target: Path, *, inputs: Iterable[Path | str | None] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `target`; renamed over it on success, removed on failure.

    A file output may replace an existing file (reports are rewritten), never a folder or a link.
    """
    target = Path(target)
    check_disjoint(target, inputs)
    parent = _parent_of(target)
    if target.is_dir():
        raise UserError(f"{target} is a folder; choose a file path for this output")
    if target.is_symlink():
        raise UserError(f"{target} is a symbolic link; dsv3c replaces only what it wrote, so remove it yourself")
    remove_stale_temporaries(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial", dir=parent)
    except OSError as e:
        raise UserError(f"{target}: cannot write in {parent} ({e.strerror})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes a private file; an output is an ordinary one
        _publish(tmp, target, parent)
    except BaseException:
        _remove(tmp)
        raise


def write_text(target: Path, text: str, *, inputs: Iterable[Path | str | None] = ()) -> None:
    """Write `text` to `target` through a temporary sibling."""
    with atomic_file(target, inputs=inputs) as tmp:
        tmp.write_text(text)


def write_bytes(target: Path, data: bytes, *, inputs: Iterable[Path | str | None] = ()) -> None:
    """Write `data` to `target` through a temporary sibling."""
    with atomic_file(target, inputs=inputs) as tmp:
        tmp.write_bytes(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
