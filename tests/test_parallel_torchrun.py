"""The command line as users run it: torchrun --nproc-per-node 2 -m dsv3c generate PART --ep 2 (gloo, CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dsv3c.cli.main import main

from .parallel_common import free_port


def test_torchrun_generate_matches_one_process(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    prompts = ["--prompt-ids", "1,2,3,4", "--prompt-ids", "9,8", "--max-new-tokens", "6", "--json"]
    assert main(["generate", str(tiny_checkpoint), *prompts]) == 0
    expected = json.loads(capsys.readouterr().out)
    part = tmp_path / "part"
    assert main(["partition", str(tiny_checkpoint), "--ep", "2", "--out", str(part)]) == 0
    capsys.readouterr()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port())]
    run = subprocess.run(
        [*launcher, "-m", "dsv3c", "generate", str(part), "--ep", "2", "--ep-timeout", "60", *prompts],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,  # two processes importing torch on a loaded 2-core machine take a while
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert [json.loads(line) for line in run.stdout.splitlines()] == [expected]  # rank 0 alone prints
