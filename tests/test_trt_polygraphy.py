"""docs/polygraphy.md's commands work on our files: every `sh` block runs against the tiny export."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "polygraphy.md"
BLOCKS = re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.S)
BIN = Path(sys.executable).parent


def _has_rtx() -> bool:
    from dsv3c.runtime.trt.backend import available

    return available() is None


@pytest.mark.skipif(shutil.which("polygraphy", path=str(BIN)) is None, reason="polygraphy is not installed")
@pytest.mark.parametrize("block", BLOCKS, ids=[b.splitlines()[0][:40] for b in BLOCKS])
def test_documented_command_works(block: str, tiny_export: Path, tmp_path: Path) -> None:
    if "TENSORRT_RTX" in block and not _has_rtx():
        pytest.skip("TensorRT-RTX is not installed")
    env = {**os.environ, "EXP": str(tiny_export), "OUT": str(tmp_path), "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[!]" not in done.stdout + done.stderr  # polygraphy's error marker
    if "--convert-to trt" in block:
        from dsv3c.runtime.trt.header import read_header

        assert read_header(tmp_path / "decode.engine").cc == ["8.9", "12.0"]


def test_every_block_is_found() -> None:
    assert len(BLOCKS) == 4 and all("polygraphy" in b for b in BLOCKS)
