"""bench/iree_cuda.py's comparison path, run here on the CPU: the iree lowering compiled for llvm-cpu and run
with IREE's local-task driver agrees with our PyTorch model and with onnxruntime on prefill and on a decode
step over the prefill's own latent cache (float32: measured max|a-b| / max|torch| ~7e-7, bound 1e-3)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("iree.compiler", reason="the mlir extra (iree-base-compiler) is not installed")
pytest.importorskip("iree.runtime", reason="the mlir extra (iree-base-runtime) is not installed")

REPO = Path(__file__).resolve().parent.parent


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "iree_cuda.py"), *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, export) of the tiny preset cut to one dense and one MoE layer without MTP: two graphs to
    trace and compile keep this file under a minute."""
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder
    from dsv3c.models.checkpoint import save_model

    from .conftest import random_model
    from .fixtures.exports import mini_config

    root = tmp_path_factory.mktemp("iree-small")
    save_model(random_model(mini_config(num_nextn_predict_layers=0)), root / "ckpt")
    export(from_folder(root / "ckpt"), root / "export", weights="checkpoint")
    return root / "ckpt", root / "export"


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
