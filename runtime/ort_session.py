"""onnxruntime sessions of export folders: CPU by default, CUDA when onnxruntime-gpu is installed and asked for.

Sessions open through onnxkit/session.py (the one setup); this module adds what only a runtime decides: "auto"
by what torch sees, and running a bfloat16 graph in float32 on the CPU provider.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from dsv3c.errors import UserError
from dsv3c.onnxkit.session import NEEDS_GPU_BUILD, SessionSetup, cuda_available, import_ort, open_session

__all__ = ["Device", "float_compute", "half_on_cpu", "import_ort", "make_session", "resolve_device"]

Device = Literal["cpu", "cuda", "auto"]


def resolve_device(device: Device) -> Literal["cpu", "cuda"]:
    """The device a run will use: `auto` means CUDA when onnxruntime-gpu and a GPU are there."""
    cuda = cuda_available()
    if device == "cuda" and not cuda:
        raise UserError(NEEDS_GPU_BUILD)
    if device == "cpu" or not cuda:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        if device == "cuda":
            raise UserError("--device cuda: onnxruntime-gpu is installed but torch sees no CUDA device")
        return "cpu"
    return "cuda"


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
    import_ort()
    if not path.is_file():
        raise UserError(f"{path}: no such graph; is this an export folder written by `dsv3c export`?")
    setup = SessionSetup(
        device=resolve_device(device), threads=threads, weights_folder=path.parent if model is not None else None
    )
    if model is None:
        return open_session(path, setup)
    from dsv3c.artifact.export_folder import check_external_data

    check_external_data(path)  # truncated or escaping weights: one line of ours, not onnxruntime's log
    return open_session(model, setup, label=str(path))
