"""Run an engine folder on a GPU TensorRT supports: the Engine protocol (engine.py) over TensorRT engines.

Device buffers are torch CUDA tensors bound by address (`set_tensor_address`), so nothing is copied on the
way in or out, and TensorRT runs on torch's current stream. The latent cache lives in LatentBuffers, as in
the onnxruntime runtime: whole buffers are bound as the past (the graphs mask slots at and beyond
positions[b, 0]) and each step's new entries are scattered into them at positions[b, i], so the cache is
carried between decode steps without copies. TensorRT-RTX engines do not run on compute capability 9.0
(H100/H200); `unavailable_reason()` says why a machine cannot run them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from dsv3c.artifact.engine_manifest import EngineManifest, read_engine_manifest
from dsv3c.errors import UserError
from dsv3c.models.config import DeepseekV3Config
from dsv3c.runtime.engine import EngineBackend, StepOutput
from dsv3c.runtime.latent_buffers import CacheShape, LatentBuffers
from dsv3c.runtime.trt.backend import TensorRTModule, load_backend, make_logger

RTX_RUNS_ON = ("8.0", "8.6", "8.9", "12.0", "12.1")  # TensorRT-RTX 1.7 refuses other GPUs (docs/toolchain.md)
TORCH_TYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT64": torch.int64,
    "INT32": torch.int32,
    "BOOL": torch.bool,
}


def unavailable_reason(folder: Path | None = None) -> str | None:
    """Why engines cannot run here (no TensorRT, no GPU, an unsupported GPU), or None when they can."""
    try:
        backend = load_backend()
    except UserError as e:
        return str(e)
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch; TensorRT engines run only on a GPU"
    major, minor = torch.cuda.get_device_capability()
    cc, name = f"{major}.{minor}", torch.cuda.get_device_name()
    if backend.is_rtx and cc not in RTX_RUNS_ON:
        return f"{backend.name} does not run on compute capability {cc} ({name}); it runs on {', '.join(RTX_RUNS_ON)}"
    if folder is not None:
        from dsv3c.runtime.trt.inspect import inspect_engine_folder

        report = inspect_engine_folder(folder, [cc])
        if not report.valid:
            return f"{folder} cannot run on this {name}: {'; '.join(report.validity)}"
    return None


class TrtGraph:
    """One deserialized engine and its execution context; `run` binds torch tensors and allocates outputs."""

    def __init__(self, backend: TensorRTModule, runtime: Any, path: Path, role: str):
        self.role = role
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"{path}: TensorRT cannot deserialize this engine on this GPU (see inspect --target-cc)")
        self.context = self.engine.create_execution_context()
        trt = backend.trt
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: TORCH_TYPES[str(self.engine.get_tensor_dtype(n)).rsplit(".", 1)[-1]] for n in names}
        self.hidden_name = next(n for n in self.outputs if n.startswith("hidden"))
        self._keep: list[torch.Tensor] = []

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._keep = []
        for name in self.inputs:
            tensor = feeds[name].to(self.dtypes[name]).contiguous()
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise UserError(
                    f"{self.role}: input {name} shape {list(tensor.shape)} is outside the engine's "
                    f"profile; rebuild with a wider --profile"
                )
            if tensor.numel() == 0:  # an empty past still needs a valid address
                tensor = torch.empty(1, dtype=tensor.dtype, device=tensor.device)
            self._keep.append(tensor)
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"{self.role}: TensorRT execution failed")
        return outputs


class TrtEngine:
    """The Engine protocol over an engine folder (see engine.py); needs a GPU TensorRT runs on."""

    def __init__(self, folder: Path):
        reason = unavailable_reason(folder)
        if reason:
            raise UserError(reason)
        self.manifest: EngineManifest = read_engine_manifest(folder)
        backend = load_backend()
        self.logger = make_logger(backend)
        self.runtime = backend.trt.Runtime(self.logger)
        self.config = DeepseekV3Config.from_dict(self.manifest.config)
        self.device = torch.device("cuda")
        self.dtype = TORCH_TYPES["BF16"] if self.manifest.cache["dtype"] == "bfloat16" else torch.float32
        self.graphs = {
            role: TrtGraph(backend, self.runtime, folder / e.file, role) for role, e in self.manifest.engines.items()
        }
        self.has_mtp = "mtp" in self.graphs and int(self.manifest.cache["mtp_layers"]) > 0
        self.mtp_depth = 1 if self.has_mtp else 0  # engines of MTP modules past the first are not run yet
        c = self.manifest.cache
        self.cache_shape = CacheShape(int(c["layers"]), int(c["ckv_width"]), int(c["kpe_width"]), self.dtype)
        self.cache: LatentBuffers | None = None
        self.mtp_cache: LatentBuffers | None = None

    def start(self, batch: int, capacity: int) -> None:
        self.cache, self.mtp_cache = self.cache_shape.allocate(batch, capacity, self.device, self.has_mtp)

    def cache_bytes_per_token(self) -> int:
        return self.cache_shape.bytes_per_token

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> StepOutput:
        return self._step("prefill", self.cache, {"input_ids": ids, "positions": positions}, positions, False)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor) -> StepOutput:
        return self._step("decode", self.cache, {"input_ids": ids, "positions": positions}, positions, True)

    def mtp(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, depth: int = 0) -> StepOutput:
        if not self.has_mtp:
            raise UserError("this engine folder has no MTP engine; build it from an export with an MTP graph")
        if depth:
            raise UserError("TensorRT engines draft with the first MTP module only; pass --mtp-depth 1")
        feeds = {"next_ids": next_ids, "hidden": hidden, "positions": positions}
        return self._step("mtp", self.mtp_cache, feeds, positions, True)

    def _step(
        self,
        role: str,
        cache: LatentBuffers | None,
        feeds: dict[str, torch.Tensor],
        positions: torch.Tensor,
        past: bool,
    ) -> StepOutput:
        if cache is None:
            raise RuntimeError("start() must be called before running an engine")
        graph = self.graphs[role]
        cache.reserve(int(positions.max()) + 1)
        if past:  # whole buffers (one row: its valid prefix), masked by the graph beyond positions[b, 0]
            used = int(positions[:, 0].max())
            cut = used if cache.batch == 1 or used == 0 else cache.capacity
            for i, (ckv, kpe) in enumerate(zip(cache.ckv, cache.kpe, strict=True)):
                feeds[f"past_ckv.{i}"], feeds[f"past_kpe.{i}"] = ckv[:, :cut], kpe[:, :cut]
        out = graph.run(feeds)
        for i in range(len(cache.ckv)):
            cache.write(i, out[f"new_ckv.{i}"], out[f"new_kpe.{i}"], positions)
        return StepOutput(out["logits"], out[graph.hidden_name])


class TrtBackend(EngineBackend):
    """The generation loop's LogitsModel over an engine folder."""

    def __init__(self, folder: Path):
        super().__init__(TrtEngine(folder))
