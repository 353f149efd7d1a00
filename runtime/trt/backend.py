"""Which TensorRT this process uses: `tensorrt` when importable, else TensorRT-RTX (`tensorrt_rtx`), lazily.

Both expose the same Python API for what dsv3c needs (Builder, OnnxParser, optimization profiles, Runtime).
TensorRT-RTX builds ahead of time without a GPU, for compute capabilities 8.0 to 12.1 (no 9.0); the full
`tensorrt` package is the data-center choice where it is installed. Nothing here imports either at start-up.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from dsv3c.errors import UserError

MODULES = ("tensorrt", "tensorrt_rtx")  # in order of preference
INSTALL_HINT = "install the TensorRT extra: pip install 'dsv3c[tensorrt]' (TensorRT-RTX from PyPI)"
# log lines every GPU-less build prints; they say nothing about the graph
_NOISE = ("cudaError 35", "CUDA driver version is insufficient", "Error reading CUDA GPU properties")


@dataclass(frozen=True)
class TensorRTModule:
    name: str  # "tensorrt" | "tensorrt_rtx"
    version: str
    trt: Any  # the imported module (typed Any: its stubs are incomplete)

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    @property
    def parser_version(self) -> str:
        get = getattr(self.trt, "get_nv_onnx_parser_version", None)
        if get is None:
            return ""
        v = int(get())
        return f"{v // 10000}.{v // 100 % 100}.{v % 100}"

    def describe(self) -> str:
        return f"{self.name} {self.version}"


@functools.cache
def load_backend(prefer: str | None = None) -> TensorRTModule:
    """The TensorRT module to use; UserError when none is installed (or `prefer` is not)."""
    names = (prefer,) if prefer else MODULES
    errors = []
    for name in names:
        try:
            module: ModuleType = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        return TensorRTModule(name, str(getattr(module, "__version__", "?")), module)
    raise UserError(f"no TensorRT found ({'; '.join(errors)}); {INSTALL_HINT}")


def available() -> str | None:
    """Why TensorRT cannot be used here, or None when it can (for tests and `make demo`)."""
    try:
        load_backend()
    except UserError as e:
        return str(e)
    return None


def make_logger(backend: TensorRTModule) -> Any:
    """An ILogger that keeps warnings and errors (minus GPU-less noise) instead of printing them."""
    trt = backend.trt

    class CollectingLogger(trt.ILogger):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if any(n in msg for n in _NOISE):
                return
            if severity <= trt.ILogger.ERROR:
                self.errors.append(msg.strip())
            elif severity == trt.ILogger.WARNING:
                self.warnings.append(msg.strip())

        def first_error(self) -> str:
            return _one_line(self.errors[0]) if self.errors else "no message from TensorRT"

    return CollectingLogger()


@contextlib.contextmanager
def native_stderr(lines: list[str]) -> Iterator[None]:
    """Collect what TensorRT's C++ code prints on file descriptor 2 (it bypasses the logger) into `lines`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            lines.extend(ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip())


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---- compute capabilities ----------------------------------------------------------------------------

KNOWN_CC = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")  # TensorRT-RTX's ComputeCapability values


def parse_cc_list(text: str) -> list[str]:
    """'8.9,12.0' -> ['8.9', '12.0']; UserError for anything that is not a known compute capability."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError("--target-cc: give compute capabilities such as 8.9,12.0")
    for cc in items:
        if cc not in KNOWN_CC:
            raise UserError(f"--target-cc: unknown compute capability {cc!r}; TensorRT-RTX knows {', '.join(KNOWN_CC)}")
    return sorted(set(items), key=lambda c: tuple(int(p) for p in c.split(".")))


def cc_enum(backend: TensorRTModule, cc: str) -> Any:
    """'8.9' -> ComputeCapability.SM89 (TensorRT-RTX only)."""
    return getattr(backend.trt.ComputeCapability, "SM" + cc.replace(".", ""))


# Block-scaled FP8 tensor cores (MXFP8: 1x32 blocks, E8M0 scales): Blackwell, 10.x and 12.x. TensorRT-RTX
# 1.7 also builds an MXFP8 graph for 8.9 (measured), where no such tensor core exists: it is refused.
MXFP8_CC = ("10.0", "10.3", "11.0", "12.0", "12.1")


def require_mxfp8(backend: TensorRTModule, target_cc: list[str], where: str) -> None:
    """UserError unless every compute capability the build targets has MXFP8; `where` names the node
    whose activation scales are computed online."""
    targets = list(target_cc) or (list(KNOWN_CC) if backend.is_rtx else [])
    if not targets:  # full TensorRT builds for the GPU it runs on
        targets = [_local_gpu_cc() or "no GPU"]
    lacking = [cc for cc in targets if cc not in MXFP8_CC]
    if not lacking:
        return
    which = f"--target-cc {','.join(target_cc)}" if target_cc else f"the default target set ({', '.join(targets)})"
    raise UserError(
        f"{where} computes its activation scales online; TensorRT quantizes online only as MXFP8 (1x32 blocks, "
        f"E8M0 scales), which needs compute capability 10.0 or 12.x, and {which} includes {', '.join(lacking)}: "
        "build with --target-cc 12.0,12.1, or quantize with static scales (dsv3c quantize --calibrate N)"
    )


def _local_gpu_cc() -> str | None:
    """The compute capability of GPU 0 (what full TensorRT builds for), or None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"
