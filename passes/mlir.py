"""MLIR through IREE's ONNX importer (`iree-import-onnx`, from iree-base-compiler), and IREE compile/run.

IREE is optional (`pip install 'dsv3c[mlir]'`: iree-base-compiler and iree-base-runtime 3.13.0); it is
imported lazily and a missing one is a UserError saying what to install. The importer reads the graph
with its external weights and embeds them in the MLIR as dense resources.

Two compile targets: `llvm-cpu` (generic x86-64, run with the `local-task` driver) and `cuda` (PTX for
one NVIDIA compute capability, run with the `cuda` driver). IREE 3.13 carries target descriptions for
some compute capabilities only (sm_60-62, 70, 72, 75, 80, 86, 87, 89, 120, 121; not sm_90 or sm_100):
for another one the module is compiled for the newest described one below it, whose PTX the CUDA
driver JIT-compiles for the GPU at load (PTX runs on any later compute capability).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

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


Backend = Literal["llvm-cpu", "cuda"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
DRIVERS: dict[Backend, str] = {"llvm-cpu": "local-task", "cuda": "cuda"}  # the runtime driver per backend
DEFAULT_GPU_TARGET = "sm_90"  # the H100 / H200

# NVIDIA compute capabilities LLVM's NVPTX backend names (the `a`/`f` feature variants are not PTX-portable)
COMPUTE_CAPABILITIES = (50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90, 100, 101, 103, 110, 120, 121)
_SM = re.compile(r"sm_(\d+)")


@dataclass(frozen=True)
class CompileTarget:
    """What iree-compile builds for: `backend`, and for cuda the GPU asked for and the target compiled."""

    backend: Backend = "llvm-cpu"
    gpu: str | None = None  # the compute capability asked for (cuda), e.g. sm_90
    compiled_for: str | None = None  # the IREE CUDA target the PTX is built for (== gpu when IREE knows it)

    @property
    def driver(self) -> str:
        return DRIVERS[self.backend]

    def flags(self) -> list[str]:
        if self.backend == "llvm-cpu":
            return ["--iree-hal-target-backends=llvm-cpu", "--iree-llvmcpu-target-cpu=generic"]
        return ["--iree-hal-target-device=cuda", f"--iree-cuda-target={self.compiled_for}"]

    def describe(self) -> str:
        if self.backend == "llvm-cpu":
            return "llvm-cpu (generic x86-64)"
        if self.compiled_for == self.gpu:
            return f"cuda {self.gpu}"
        return (
            f"cuda {self.gpu} (PTX for {self.compiled_for}, JIT-compiled by the driver: IREE has no {self.gpu} target)"
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": self.backend, "driver": self.driver}
        if self.backend == "cuda":
            out |= {"gpu_target": self.gpu, "compiled_for": self.compiled_for}
        return out


def parse_gpu_target(text: str) -> int:
    """sm_NN -> NN, or a UserError naming the accepted form."""
    match = _SM.fullmatch(text.strip())
    if not match or int(match.group(1)) not in COMPUTE_CAPABILITIES:
        known = ", ".join(f"sm_{c}" for c in COMPUTE_CAPABILITIES)
        raise UserError(f"--gpu-target '{text}' is not an NVIDIA compute capability; give one of {known}")
    return int(match.group(1))


def compile_target(backend: str, gpu_target: str | None = None) -> CompileTarget:
    """The target for `backend` (and `gpu_target` for cuda), checked before any work is done."""
    if backend not in BACKENDS:
        raise UserError(f"--backend '{backend}': IREE backends here are {', '.join(BACKENDS)}")
    if backend == "llvm-cpu":
        if gpu_target is not None:
            raise UserError("--gpu-target names the GPU for --backend cuda; llvm-cpu compiles for the CPU")
        return CompileTarget("llvm-cpu")
    gpu = gpu_target or DEFAULT_GPU_TARGET
    wanted = parse_gpu_target(gpu)
    reason = iree_available()
    if reason:
        raise UserError(f"--backend cuda: {reason}")
    for capability in sorted((c for c in COMPUTE_CAPABILITIES if c <= wanted), reverse=True):
        if _cuda_target_known(f"sm_{capability}"):
            return CompileTarget("cuda", f"sm_{wanted}", f"sm_{capability}")
    raise UserError(f"--gpu-target {gpu}: this iree-compile describes no CUDA target at or below it")


_PROBE = """func.func @f(%a: tensor<4xf32>) -> tensor<4xf32> {
  %0 = arith.addf %a, %a : tensor<4xf32>
  return %0 : tensor<4xf32>
}
"""


@functools.cache
def _cuda_target_known(target: str) -> bool:
    """Whether iree-compile has a target description for `target`: it compiles a 4-element add (0.5 s)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.mlir"
        source.write_text(_PROBE)
        command = [
            *_tool("iree-compile", "iree.compiler.tools.scripts.iree_compile"),
            str(source),
            "-o",
            str(Path(tmp) / "probe.vmfb"),
            "--iree-hal-target-device=cuda",
            f"--iree-cuda-target={target}",
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    if (
        result.returncode != 0
        and "missing GPU target" not in result.stderr
        and "Unknown CUDA target" not in result.stderr
    ):
        raise UserError(f"iree-compile --iree-cuda-target={target} failed: {result.stderr.strip()[-300:]}")
    return result.returncode == 0


def compile_mlir(mlir_file: Path, vmfb: Path, target: CompileTarget | None = None) -> Path:
    """iree-compile `mlir_file` for `target` (default: the generic CPU)."""
    target = target or CompileTarget()
    command = [
        *_tool("iree-compile", "iree.compiler.tools.scripts.iree_compile"),
        str(mlir_file),
        "-o",
        str(vmfb),
        *target.flags(),
    ]
    _run(command, f"iree-compile {mlir_file.name} for {target.backend}")
    return vmfb


class IreeModule:
    """A compiled module loaded once on one device of `driver` (local-task: the CPU; cuda: the GPU).

    `upload` puts inputs on the device ahead of time, so that `call` times the module's work and not the
    host-to-device copies; outputs stay on the device until `to_numpy`.
    """

    def __init__(self, vmfb: Path, driver: str = "local-task") -> None:
        import iree.runtime as rt

        try:
            self.device = rt.get_device(driver)
        except (RuntimeError, ValueError) as e:
            hint = ""
            if driver == "cuda" and "libcuda.so" in str(e):  # IREE dlopens the unversioned name only
                hint = (
                    " (IREE loads 'libcuda.so'; where only libcuda.so.1 exists, link it as libcuda.so in a "
                    "folder on LD_LIBRARY_PATH)"
                )
            raise UserError(f"IREE's {driver} driver has no device here: {_first_line(e)}{hint}") from None
        config = rt.Config(device=self.device)
        self.context = rt.SystemContext(config=config)
        try:
            self.context.add_vm_module(rt.VmModule.copy_buffer(self.context.instance, vmfb.read_bytes()))
        except RuntimeError as e:
            raise UserError(f"{vmfb} does not load on IREE's {driver} driver: {_first_line(e)}") from None
        self.driver = driver

    def upload(self, arrays: list[np.ndarray]) -> list[Any]:
        import iree.runtime as rt

        return [rt.asdevicearray(self.device, np.ascontiguousarray(a)) for a in arrays]

    def call(self, function: str, inputs: list[Any]) -> list[Any]:
        """Run `function`; returns when its outputs are computed (the synchronous entry point waits)."""
        result: Any = self.context.modules.module[function](*inputs)
        return list(result) if isinstance(result, tuple | list) else [result]

    @staticmethod
    def to_numpy(outputs: list[Any]) -> list[np.ndarray]:
        return [np.asarray(o.to_host() if hasattr(o, "to_host") else o) for o in outputs]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def module_exports(vmfb: Path) -> list[str]:
    """The functions a compiled module exports, read without any device (the VM loads the bytecode only)."""
    import iree.runtime as rt

    try:
        module = rt.VmModule.copy_buffer(rt.VmInstance(), vmfb.read_bytes())
    except RuntimeError as e:
        raise UserError(f"{vmfb} is not an IREE module: {_first_line(e)}") from None
    return list(module.function_names)


def run_vmfb(vmfb: Path, function: str, inputs: list[np.ndarray], driver: str = "local-task") -> list[np.ndarray]:
    """Run `function` of a compiled module once on `driver` (default: the local CPU); outputs as numpy arrays."""
    module = IreeModule(vmfb, driver)
    return module.to_numpy(module.call(function, inputs))
