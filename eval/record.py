"""What every result file records besides its numbers: the command, the commit and the machine."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from dsv3c.artifact.atomic import write_text

REPO = Path(__file__).resolve().parent.parent


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "load_average": list(os.getloadavg()),
    }


def run_record(argv: list[str] | None = None, commit: str = "") -> dict[str, Any]:
    """`commit` overrides the checkout's own (a device's copy may carry an older .git than the tree it runs)."""
    args = sys.argv if argv is None else argv
    return {
        "command": " ".join(args if argv is not None else [Path(sys.executable).name, *args]),
        "commit": commit or _commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }


def write_result(path: Path, result: dict[str, Any]) -> None:
    write_text(path, json.dumps(result, indent=2) + "\n")
