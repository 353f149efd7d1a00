"""MLIR through IREE's ONNX importer (`iree-import-onnx`, from iree-base-compiler), and IREE compile/run.

IREE is optional (`pip install 'dsv3c[mlir]'`: iree-base-compiler and iree-base-runtime 3.13.0); it is
imported lazily and a missing one is a UserError saying what to install. The importer reads the graph
with its external weights and embeds them in the MLIR as dense resources.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from dsv3c.errors import UserError

INSTALL = "install IREE: pip install iree-base-compiler==3.13.0 iree-base-runtime==3.13.0 (the 'mlir' extra)"


def iree_available() -> str | None:
    """None when IREE's compiler and runtime are importable, else the reason."""
    for module in ("iree.compiler", "iree.runtime"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"{module} is not installed; {INSTALL}"
    return None


def _tool(name: str, module: str) -> list[str]:
    """The command for an IREE tool: the console script beside this Python, on PATH, or `python -m`."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip() and not ln.startswith(" #")]
        raise UserError(f"{what} failed (exit {result.returncode}): {' | '.join(lines[-3:])[:600]}")


def import_onnx(onnx_file: Path, mlir_file: Path) -> Path:
    """onnx_file (weights beside it) -> MLIR text (torch-onnx dialect) at mlir_file."""
    reason = iree_available()
    if reason:
        raise UserError(f"--emit mlir: {reason}")
    _run(
        [*_tool("iree-import-onnx", "iree.compiler.tools.import_onnx"), str(onnx_file), "-o", str(mlir_file)],
        f"iree-import-onnx {onnx_file.name}",
    )
    return mlir_file


def compile_mlir(mlir_file: Path, vmfb: Path, backend: str = "llvm-cpu") -> Path:
    """iree-compile for `backend` (generic CPU for llvm-cpu)."""
    command = [
        *_tool("iree-compile", "iree.compiler.tools.scripts.iree_compile"),
        str(mlir_file),
        "-o",
        str(vmfb),
        f"--iree-hal-target-backends={backend}",
    ]
    if backend == "llvm-cpu":
        command.append("--iree-llvmcpu-target-cpu=generic")
    _run(command, f"iree-compile {mlir_file.name}")
    return vmfb


def run_vmfb(vmfb: Path, function: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Run `function` of a compiled module on the local CPU; outputs as numpy arrays."""
    import iree.runtime as rt

    config = rt.Config("local-task")
    context = rt.SystemContext(config=config)
    context.add_vm_module(rt.VmModule.copy_buffer(context.instance, vmfb.read_bytes()))
    result: Any = context.modules.module[function](*inputs)
    outputs = result if isinstance(result, tuple | list) else [result]
    return [np.asarray(o.to_host() if hasattr(o, "to_host") else o) for o in outputs]
