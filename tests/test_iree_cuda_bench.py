"""bench/iree_cuda.py's comparison path, run here on the CPU: the iree lowering compiled for llvm-cpu and run
with IREE's local-task driver agrees with our PyTorch model and with onnxruntime on prefill and on a decode
step over the prefill's own latent cache (float32: measured max|a-b| / max|torch| ~7e-7, bound 1e-3)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .fixtures.iree_small import small_checkpoint_and_export

pytest.importorskip("iree.compiler", reason="the mlir extra (iree-base-compiler) is not installed")
pytest.importorskip("iree.runtime", reason="the mlir extra (iree-base-runtime) is not installed")

REPO = Path(__file__).resolve().parent.parent


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "iree_cuda.py"), *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return small_checkpoint_and_export(tmp_path_factory.mktemp("iree-small"))


@pytest.fixture(scope="module")
def cpu_folder(small: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dsv3c.passes.lower import lower_folder
    from dsv3c.passes.mlir import compile_target
    from dsv3c.passes.pipelines import Target

    out = tmp_path_factory.mktemp("iree-cpu") / "tiny-cpu"
    lower_folder(small[1], out, Target.IREE, compile_for=compile_target("llvm-cpu"))
    return out


def test_local_task_agrees_with_pytorch_and_onnxruntime(
    cpu_folder: Path, small: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "result.json"
    result = bench(
        str(cpu_folder),
        "--checkpoint",
        str(small[0]),
        "--driver",
        "local-task",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["within_tolerance"] and record["tolerance"]["rtol"] == 1e-3 and record["dtype"] == "float32"
    assert record["command"] and record["commit"] and record["machine"]["iree_runtime"]
    for role in ("prefill", "decode"):
        for pair in ("iree_vs_torch", "onnxruntime_vs_torch", "iree_vs_onnxruntime"):
            error = record["parity"][role][pair]
            assert error["rel"] < 1e-4 and error["top1"] == 1.0, (role, pair, error)
    for runtime in ("iree", "onnxruntime", "torch"):
        assert record["timing_ms"][runtime]["prefill"] > 0 and record["timing_ms"][runtime]["decode"] > 0


def test_a_cpu_module_is_not_run_on_cuda(cpu_folder: Path, small: tuple[Path, Path]) -> None:
    result = bench(str(cpu_folder), "--checkpoint", str(small[0]), "--driver", "cuda")
    assert result.returncode == 2 and "run it with --driver local-task" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
