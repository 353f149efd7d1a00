"""onnxruntime sessions: CPU by default, CUDA when onnxruntime-gpu is installed and asked for.

onnxruntime-gpu replaces onnxruntime (the same import name): uninstall one before installing the other,
never both (README: Switching to GPU onnxruntime).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from dsv3c.errors import UserError

Device = Literal["cpu", "cuda", "auto"]


def import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed; install onnxruntime (CPU) or onnxruntime-gpu") from None
    return ort


def resolve_device(device: Device) -> Literal["cpu", "cuda"]:
    """The device a run will use: `auto` means CUDA when onnxruntime-gpu and a GPU are there."""
    ort = import_ort()
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not cuda:
        raise UserError(
            "--device cuda needs onnxruntime-gpu (it replaces onnxruntime; see README: Switching to GPU onnxruntime)"
        )
    if device == "cpu" or not cuda:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        if device == "cuda":
            raise UserError("--device cuda: onnxruntime-gpu is installed but torch sees no CUDA device")
        return "cpu"
    return "cuda"


def providers_for(device: Device) -> list[str]:
    if resolve_device(device) == "cuda":
        ort = import_ort()
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def half_on_cpu(path: Path, device: Device) -> bool:
    """Whether `path` computes in bfloat16/float16 and runs on onnxruntime's CPU provider, which lacks
    kernels for them: the graph is then run in float32 (runtime/float_compute.py)."""
    if resolve_device(device) != "cpu":
        return False
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    half = (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16)
    return any(v.type.tensor_type.elem_type in half for v in [*graph.input, *graph.output])


def float_compute(path: Path) -> bytes:
    """The graph at `path` computing in float32 (its weights still read from its folder, as stored)."""
    import onnx_ir as ir
    from dsv3c.runtime.float_compute import compute_in_float32

    model = ir.load(path)
    compute_in_float32(model)
    proto = ir.serde.serialize_model(model)
    return bytes(proto.SerializeToString())


def make_session(path: Path, device: Device = "cpu", threads: int = 0, model: bytes | None = None) -> Any:
    """An InferenceSession with full graph optimization; a clear error for a file that will not load.
    `model`: the graph's bytes to use instead of the file (its external weights still read beside `path`)."""
    ort = import_ort()
    if not path.is_file():
        raise UserError(f"{path}: no such graph; is this an export folder written by `dsv3c export`?")
    from dsv3c.artifact.export_folder import check_external_data

    check_external_data(path)  # truncated or escaping weights: one line of ours, not onnxruntime's log
    options = ort.SessionOptions()
    if model is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model if model is not None else str(path), options, providers=providers_for(device))
    except Exception as e:  # onnxruntime raises its own exception types; report one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: onnxruntime cannot load this graph: {first[:300]}") from None
