"""The one way dsv3c opens an onnxruntime session: from a file or a serialized model, on a device's providers,
at a graph optimization level, with the options every caller needs (errors-only logging, external weights of
an in-memory graph read from its folder, one-line errors).

This module alone imports onnxruntime (lazily, so a missing one is a one-line error, not an ImportError at
start-up). onnxruntime-gpu replaces onnxruntime under the same import name: one is installed, never both
(README: Switching to GPU onnxruntime). It imports no torch: choosing "auto" by what torch sees is the
runtime's business (runtime/ort_session.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from dsv3c.errors import UserError

Device = Literal["cpu", "cuda"]
Optimization = Literal["all", "extended", "basic", "none"]

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
ERRORS_ONLY = 3  # onnxruntime's log severity: 0 verbose .. 4 fatal; warnings would clutter the CLI's stderr
# onnxruntime's CUDA QMoE reads its weights as a blob packed for the GPU's architecture (its
# pack_weights_for_cuda_mixed_gemm), not the [E, N, K] rows its CPU kernel and `lower --weights-8bit` use: fed
# those, it computes wrong outputs without an error (bench/gpu_moe_routing.py). Benchmarks that time it anyway
# set this variable to 1.
TIME_UNPACKED_QMOE = "DSV3C_TIME_UNPACKED_QMOE"
QMOE_ON_CUDA = (
    "has com.microsoft::QMoE nodes (`lower --weights-8bit`), whose CUDA kernel needs weights packed for the GPU "
    "(onnxruntime's pack_weights_for_cuda_mixed_gemm, not done yet) and would give wrong outputs: run it with "
    "--device cpu, or lower without --weights-8bit for the GPU"
)
NEEDS_GPU_BUILD = (
    "--device cuda needs onnxruntime-gpu (it replaces onnxruntime; see README: Switching to GPU onnxruntime)"
)


def import_ort() -> Any:
    """onnxruntime, or a UserError when neither onnxruntime nor onnxruntime-gpu (same import name) is installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed; install onnxruntime (CPU) or onnxruntime-gpu") from None
    return ort


def cuda_available() -> bool:
    """Whether the installed onnxruntime has the CUDA execution provider (onnxruntime-gpu)."""
    return CUDA_PROVIDER in import_ort().get_available_providers()


def providers_for(device: Device, cuda_options: Mapping[str, str] | None = None) -> list[Any]:
    """The execution providers for `device`, in onnxruntime's order of preference: CUDA falls back to the CPU
    for the nodes it has no kernel for."""
    if device not in get_args(Device):
        raise UserError(f"unknown onnxruntime device {device!r}; expected one of {', '.join(get_args(Device))}")
    if device == "cpu":
        return [CPU_PROVIDER]
    ort = import_ort()
    if not cuda_available():
        raise UserError(NEEDS_GPU_BUILD)
    if hasattr(ort, "preload_dlls"):  # the CUDA/cuDNN libraries of the pip wheels, found before the first session
        ort.preload_dlls()
    return [(CUDA_PROVIDER, dict(cuda_options)) if cuda_options else CUDA_PROVIDER, CPU_PROVIDER]


@dataclass(frozen=True)
class SessionSetup:
    """How to open one session. The defaults are what generation and benchmarks run with."""

    device: Device = "cpu"
    optimization: Optimization = "all"  # "none" keeps every node (numeric comparison reads intermediate values)
    threads: int = 0  # intra-op threads; 0 leaves onnxruntime's default (one per core)
    weights_folder: Path | None = None  # where the external weights of a graph given as bytes live
    fixed_dims: Mapping[str, int] = field(default_factory=dict)  # symbolic dimension -> size, folded at load
    cuda_options: Mapping[str, str] = field(default_factory=dict)  # CUDA provider options (enable_cuda_graph, ...)
    profile_prefix: str | None = None  # write onnxruntime's per-node profile to files starting with this
    memory_pattern: bool = True  # onnxruntime's memory pattern: one block per run for the planned buffers

    def __post_init__(self) -> None:
        if self.optimization not in get_args(Optimization):
            raise UserError(
                f"unknown graph optimization {self.optimization!r}; expected one of {get_args(Optimization)}"
            )
        if self.threads < 0:
            raise UserError(f"threads must be 0 (onnxruntime's default) or positive, not {self.threads}")
        if self.cuda_options and self.device != "cuda":
            raise UserError(f"CUDA provider options given for a {self.device} session")


def session_options(setup: SessionSetup) -> Any:
    """onnxruntime's SessionOptions for `setup`."""
    ort = import_ort()
    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[setup.optimization]
    options.log_severity_level = ERRORS_ONLY
    if setup.threads:
        options.intra_op_num_threads = setup.threads
    if setup.weights_folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(setup.weights_folder)
        )
    for name, size in setup.fixed_dims.items():
        options.add_free_dimension_override_by_name(name, size)
    options.enable_mem_pattern = setup.memory_pattern
    if setup.profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = setup.profile_prefix
    return options


def open_session(
    model: Path | bytes, setup: SessionSetup = SessionSetup(), *, label: str | None = None, what: str = "this graph"
) -> Any:
    """An InferenceSession of `model` (an ONNX file, or a serialized ModelProto), or a one-line UserError:
    "LABEL: onnxruntime cannot load WHAT: <onnxruntime's first line>". A file's external weights are checked
    first (escaping its folder, past the end of a truncated file), so onnxruntime never logs about them."""
    ort = import_ort()
    if isinstance(model, Path):
        from dsv3c.artifact.export_folder import check_external_data

        if not model.is_file():
            raise UserError(f"{model}: no such ONNX file")
        check_external_data(model)
        label = str(model) if label is None else label
    if setup.device == "cuda" and os.environ.get(TIME_UNPACKED_QMOE) != "1" and has_qmoe(model):
        raise UserError(f"{label or 'this graph'} {QMOE_ON_CUDA}")
    options = session_options(setup)
    providers = providers_for(setup.device, setup.cuda_options)
    try:
        return ort.InferenceSession(str(model) if isinstance(model, Path) else model, options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types; report one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = f"{label}: " if label else ""
        raise UserError(f"{where}onnxruntime cannot load {what}: {first[:300]}") from None


def has_qmoe(model: Path | bytes) -> bool:
    """Does the main graph of `model` (a file, or a serialized ModelProto) hold a com.microsoft::QMoE node?"""
    import onnx

    proto = onnx.load(model, load_external_data=False) if isinstance(model, Path) else onnx.load_from_string(model)
    return any(n.op_type == "QMoE" and n.domain == "com.microsoft" for n in proto.graph.node)
