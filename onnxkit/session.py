"""The one way dsv3c opens an onnxruntime session: from a file or a serialized model, on a device's providers,
at a graph optimization level, with the options every caller needs (errors-only logging, external weights of
an in-memory graph read from its folder, QMoE weights packed for CUDA, one-line errors).

This module alone imports onnxruntime (lazily, so a missing one is a one-line error, not an ImportError at
start-up). onnxruntime-gpu replaces onnxruntime under the same import name: one is installed, never both
(README: Switching to GPU onnxruntime). It imports no torch (onnxruntime's QMoE packer does, when a CUDA
session has QMoE): choosing "auto" by what torch sees is the runtime's business (runtime/ort_session.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from dsv3c.errors import UserError
from dsv3c.onnxkit.kernel_routing import qmoe_routing_in_kernel

Device = Literal["cpu", "cuda"]
Optimization = Literal["all", "extended", "basic", "none"]

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
ERRORS_ONLY = 3  # onnxruntime's log severity: 0 verbose .. 4 fatal; warnings would clutter the CLI's stderr
# onnxruntime's CUDA QMoE reads its 8-bit expert weights as a blob packed for CUTLASS's mixed-input GEMM
# (onnxruntime's own packer, SM80 layout, which Hopper runs as well), not the [E, N, K] rows that its CPU
# kernel and `lower --weights-8bit` use: fed those rows it computes wrong outputs without an error
# (bench/gpu_moe_routing.py). A CUDA session packs them at load, so one folder serves both EPs.
UNPACKED_QMOE = "DSV3C_UNPACKED_QMOE"  # "1": give CUDA the rows as stored (wrong outputs; benchmarks' A/B only)
# A CUDA session also moves a QMoE layer's plain softmax routing from the graph into the kernel, which
# honors normalize_routing_weights=0 where the CPU's does not (onnxkit/kernel_routing.py)
GRAPH_ROUTED_QMOE = "DSV3C_GRAPH_ROUTED_QMOE"  # "1": keep the graph's routing (benchmarks' A/B only)
QMOE_PACK_ARCH = 80  # the SM90 layout needs an attribute onnxruntime 1.31's QMoE does not have (wrong outputs)
QMOE_WEIGHTS = (2, 5)  # QMoE's inputs: fc1 and fc2 expert weights
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
    providers = providers_for(setup.device, setup.cuda_options)
    packed: dict[str, Any] = {}
    if setup.device == "cuda":
        model, setup, weights = _for_cuda_qmoe(model, setup, label)
        packed = {n: ort.OrtValue.ortvalue_from_numpy(w) for n, w in weights.items()}
    options = session_options(setup)
    if packed:  # in place of the graph's external initializers before placement: copied to the GPU like them
        # (add_initializer would keep a CPU value off a CUDA-placed initializer, and use the graph's instead)
        options.add_external_initializers(list(packed), list(packed.values()))
    try:
        session = ort.InferenceSession(str(model) if isinstance(model, Path) else model, options, providers=providers)
        session.dsv3c_packed_qmoe = packed  # onnxruntime reads the added initializers' memory: keep it alive
        return session
    except Exception as e:  # onnxruntime raises its own exception types; report one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = f"{label}: " if label else ""
        raise UserError(f"{where}onnxruntime cannot load {what}: {first[:300]}") from None


def _qmoe_nodes(graph: Any) -> list[Any]:
    return [n for n in graph.node if n.op_type == "QMoE" and n.domain == "com.microsoft"]


def cuda_qmoe_nodes(graph: Any) -> list[Any]:
    """The QMoE nodes CUDA runs: 16-bit ones (scales, input 3, in the activations' type); a float32 QMoE has
    no CUDA kernel and runs on the CPU, which reads the rows as stored and always renormalizes."""
    import onnx

    half = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    types = {t.name: t.data_type for t in graph.initializer}
    return [n for n in _qmoe_nodes(graph) if len(n.input) > 3 and types.get(n.input[3]) in half]


def cuda_qmoe_weight_names(graph: Any) -> list[str]:
    """The expert weights of the QMoE nodes CUDA runs (cuda_qmoe_nodes)."""
    names = {n.input[i] for n in cuda_qmoe_nodes(graph) for i in QMOE_WEIGHTS if i < len(n.input) and n.input[i]}
    return sorted(names)


def _for_cuda_qmoe(
    model: Path | bytes, setup: SessionSetup, label: str | None
) -> tuple[Path | bytes, SessionSetup, dict[str, np.ndarray]]:
    """`model` and `setup` for a CUDA session, with the packed QMoE weights that are external in the graph
    apart (onnxruntime takes those as external initializers); the embedded ones are packed into the graph's
    bytes, whose external weights are then read from the model's folder, as are those of a graph whose
    QMoE routing moved into the kernel. UNPACKED_QMOE and GRAPH_ROUTED_QMOE each turn one of the two off."""
    import dataclasses

    import onnx
    from onnx import numpy_helper

    folder = model.parent if isinstance(model, Path) else setup.weights_folder
    proto = onnx.load(model, load_external_data=False) if isinstance(model, Path) else onnx.load_from_string(model)
    packed = cuda_qmoe_weights(proto, folder, label) if os.environ.get(UNPACKED_QMOE) != "1" else {}
    routed = 0
    if os.environ.get(GRAPH_ROUTED_QMOE) != "1":
        routed = qmoe_routing_in_kernel(proto, nodes={n.name for n in cuda_qmoe_nodes(proto.graph)})
    embedded = [t for t in proto.graph.initializer if t.name in packed and t.data_location != onnx.TensorProto.EXTERNAL]
    if not embedded and not routed:
        return model, setup, packed
    for t in embedded:
        t.CopyFrom(numpy_helper.from_array(packed.pop(t.name), t.name))
    return proto.SerializeToString(), dataclasses.replace(setup, weights_folder=folder), packed


def cuda_qmoe_weights(proto: Any, folder: Path | None, label: str | None = None) -> dict[str, np.ndarray]:
    """The 8-bit expert weights of the ModelProto `proto`'s 16-bit QMoE nodes (initializers, external ones read
    from `folder`) packed as onnxruntime's CUDA QMoE reads them: each expert's [N, K] rows through
    onnxruntime's packer, stored in the same [E, N, K] uint8 shape. Empty without such nodes; a UserError
    for weights the kernel cannot take or a packer that cannot run."""
    from onnx import numpy_helper

    names = cuda_qmoe_weight_names(proto.graph)
    if not names:
        return {}
    where = f"{label}: " if label else ""
    initializers = {t.name: t for t in proto.graph.initializer}
    packed, memo = {}, {}
    for name in names:
        if name not in initializers:
            raise UserError(f"{where}QMoE weight {name} is computed, not stored; CUDA needs it stored to pack it")
        key = _stored_bytes_key(initializers[name], folder)
        if key is not None and key in _last_packed:
            packed[name] = memo[key] = _last_packed[key]
            continue
        q = numpy_helper.to_array(initializers[name], base_dir=str(folder or ""))
        if q.dtype != np.uint8 or q.ndim != 3 or q.shape[2] % 64 or q.shape[1] % 8:
            raise UserError(
                f"{where}QMoE weight {name} ({q.dtype} {list(q.shape)}) is not 8-bit [E, N, K] with K a multiple "
                "of 64 and N of 8, which CUDA's QMoE needs; lower without --weights-8bit for the GPU"
            )
        try:
            packed[name] = pack_qmoe_experts(q)
        except (ImportError, ValueError, RuntimeError) as e:  # no torch, no packer, a shape it refuses
            raise UserError(f"{where}cannot pack QMoE weight {name} for CUDA: {str(e).splitlines()[0][:200]}") from None
        if key is not None:
            memo[key] = packed[name]
    _last_packed.clear()  # only the latest model's: a session holds its own packed weights while it lives
    _last_packed.update(memo)
    return packed


# The external QMoE weights packed last, by where their bytes are stored: a decoder opens a session per
# (batch, capacity) bucket of one folder, and packing V2-Lite's 14G expert weights again for each costs
# seconds to minutes. An edited weights file has another size or mtime, so it is packed anew.
_last_packed: dict[tuple[object, ...], np.ndarray] = {}


def _stored_bytes_key(tensor: Any, folder: Path | None) -> tuple[object, ...] | None:
    """Where an external initializer's bytes lie, with its file's size and mtime; None for an embedded one."""
    import onnx

    if tensor.data_location != onnx.TensorProto.EXTERNAL or folder is None:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    path = (folder / info.get("location", "")).resolve()
    try:
        stat = path.stat()
    except OSError:
        return None  # to_array reports the missing file
    return (str(path), stat.st_size, stat.st_mtime_ns, info.get("offset", "0"), info.get("length", ""), tensor.name)


PACK_CHUNK = 1 << 26  # weights packed per call: the packer widens them to int64 (8 bytes each) on the way


def pack_qmoe_experts(q: np.ndarray, chunk: int = PACK_CHUNK) -> np.ndarray:
    """8-bit expert rows [E, N, K] (uint8, zero point 128) in CUDA QMoE's layout, same shape: onnxruntime's
    packer given consecutive experts as one [e N, K] matrix, which packs adjacent pairs of rows together and
    so, for an even N, each expert as it would alone (tests/test_onnxkit_session_qmoe.py); about `chunk`
    weights a call, which bounds its memory (V3's fc1 is 3.8G weights a layer); on the GPU when torch sees one."""
    from onnxruntime.quantization.cuda_quantizer import _pack_weights_for_cuda_mixed_gemm as pack

    experts, n, k = q.shape
    step = max(1, chunk // (n * k))
    parts = []
    for first in range(0, experts, step):
        rows = np.array(q[first : first + step].reshape(-1, k))  # a writable copy: the packer hands it to torch
        parts.append(np.asarray(pack(rows, rows.shape[0], k, 8, QMOE_PACK_ARCH)).view(np.uint8))
    return np.concatenate(parts).reshape(q.shape)
