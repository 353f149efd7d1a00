"""onnxruntime sessions: CPU by default, CUDA when onnxruntime-gpu is installed and asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from dsv3c.errors import UserError

Device = Literal["cpu", "cuda", "auto"]


def providers_for(device: Device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not cuda:
        raise UserError(
            "--device cuda needs onnxruntime-gpu (it replaces onnxruntime; see README: Switching to GPU onnxruntime)"
        )
    if device == "cuda" or (device == "auto" and cuda):
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(path: Path, device: Device = "cpu", threads: int = 0):  # type: ignore[no-untyped-def]
    """An InferenceSession with full graph optimization; a clear error for a file that will not load."""
    import onnxruntime as ort

    if not path.is_file():
        raise UserError(f"{path}: no such graph; is this an export folder written by `dsv3c export`?")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=providers_for(device))
    except Exception as e:  # onnxruntime raises its own exception types; report one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: onnxruntime cannot load this graph: {first[:300]}") from None
