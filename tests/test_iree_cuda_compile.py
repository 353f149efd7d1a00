"""The iree lowering compiled for CUDA on a machine without a GPU: `dsv3c lower --emit vmfb --backend cuda`.

The modules are checked without a device: the VM loads their bytecode and lists the exports, and the PTX they
embed is for the target the lowering recorded. IREE 3.13 has no sm_90 description, so sm_90 is built as PTX for
the newest target below it that this iree-compile describes, which the CUDA driver JIT-compiles at load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dsv3c.errors import UserError

from .fixtures.iree_small import small_checkpoint_and_export

pytest.importorskip("iree.compiler", reason="the mlir extra (iree-base-compiler) is not installed")
pytest.importorskip("iree.runtime", reason="the mlir extra (iree-base-runtime) is not installed")

REPO = Path(__file__).resolve().parent.parent


def dsv3c(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dsv3c", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return small_checkpoint_and_export(tmp_path_factory.mktemp("iree-small"))


@pytest.fixture(scope="module")
def cuda_folder(small: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dsv3c.passes.lower import lower_folder
    from dsv3c.passes.mlir import compile_target
    from dsv3c.passes.pipelines import Target

    try:
        target = compile_target("cuda", "sm_90")
    except UserError as e:  # a compiler built without the CUDA target
        pytest.skip(f"iree-compile cannot target CUDA here: {e}")
    out = tmp_path_factory.mktemp("iree-cuda") / "tiny-cuda"
    lower_folder(small[1], out, Target.IREE, compile_for=target)
    return out


def test_cuda_modules_are_written_for_the_recorded_target(cuda_folder: Path) -> None:
    from dsv3c.passes.mlir import COMPUTE_CAPABILITIES, module_exports

    stage = json.loads((cuda_folder / "manifest.json").read_text())["stages"][-1]
    vmfb = stage["vmfb"]
    assert vmfb["backend"] == "cuda" and vmfb["driver"] == "cuda" and vmfb["gpu_target"] == "sm_90"
    compiled = int(vmfb["compiled_for"].removeprefix("sm_"))
    assert compiled in COMPUTE_CAPABILITIES and compiled <= 90
    for role in ("prefill", "decode"):
        module = cuda_folder / vmfb["files"][role]
        assert role in module_exports(module)
        data = module.read_bytes()
        assert b"cuda-nvptx-fb" in data  # the CUDA executable format, not the CPU's embedded ELF
        assert f".target {vmfb['compiled_for']}".encode() in data  # PTX for the recorded target


def test_bench_without_a_cuda_device_is_one_line(cuda_folder: Path, small: tuple[Path, Path]) -> None:
    import iree.runtime as rt

    try:
        rt.get_device("cuda")
        pytest.skip("this machine has a CUDA device")
    except (RuntimeError, ValueError):
        pass
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "iree_cuda.py"), str(cuda_folder), "--checkpoint", str(small[0])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "cuda driver has no device" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--backend", "cuda", "--gpu-target", "sm_999"), "is not an NVIDIA compute capability"),
        (("--backend", "cuda", "--gpu-target", "hopper"), "is not an NVIDIA compute capability"),
        (("--backend", "rocm"), "IREE backends here are llvm-cpu, cuda"),
        (("--backend", "llvm-cpu", "--gpu-target", "sm_90"), "--gpu-target names the GPU for --backend cuda"),
    ],
)
def test_bad_targets_are_one_line(tmp_path: Path, flags: tuple[str, ...], message: str) -> None:
    # refused before any work: the export folder is never read
    result = dsv3c(
        "lower", str(tmp_path / "none"), "--target", "iree", "--out", str(tmp_path / "o"), "--emit", "vmfb", *flags
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_target_flags_need_emit_vmfb(tmp_path: Path) -> None:
    result = dsv3c(
        "lower", str(tmp_path / "none"), "--target", "iree", "--out", str(tmp_path / "o"), "--gpu-target", "sm_90"
    )
    assert result.returncode == 2 and "pass --emit vmfb too" in result.stderr
