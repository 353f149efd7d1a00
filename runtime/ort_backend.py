"""onnxruntime runtime over an export folder: prefill.onnx, decode.onnx and mtp(.{d}).onnx with I/O binding.

Every tensor a graph reads or writes is a torch tensor bound by pointer (CPU, or CUDA with
onnxruntime-gpu), so nothing is copied on the way in or out: the latent cache buffers are bound whole as
the past (the graph masks slots at and beyond positions[b, 0]), the q new entries per row come back in
small bound outputs and are scattered into the buffers at positions[b, i]. A decode or MTP graph
of `lower --target ort` writes them itself (`--decode-cache in-place`, the default): its present outputs
are bound onto the past buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from dsv3c.artifact.manifest import Manifest, Signature, read_manifest
from dsv3c.artifact.names import PRESENT_PREFIXES, mtp_role, mtp_roles, present_name
from dsv3c.errors import UserError
from dsv3c.models.config import DeepseekV3Config
from dsv3c.runtime.engine import EngineBackend, StepOutput
from dsv3c.runtime.latent_buffers import CacheShape, LatentBuffers
from dsv3c.runtime.ort_session import Device, float_compute, half_on_cpu, import_ort, make_session, resolve_device

TORCH_TYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
ONNX_TYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.int64: 7}  # TensorProto enum


class OrtGraph:
    """One session and its signature; `run` binds torch tensors in and allocates torch outputs."""

    def __init__(self, manifest: Manifest, role: str, device: Device, threads: int, torch_device: torch.device):
        self.role, self.device = role, torch_device
        path = manifest.graph_path(role)
        self.float_compute = half_on_cpu(path, device)  # bf16 on the CPU provider: computed in float32
        self.session = make_session(path, device, threads, float_compute(path) if self.float_compute else None)
        self.signature: Signature = manifest.signatures[role]
        unknown = [t.name for t in (*self.signature.inputs, *self.signature.outputs) if t.dtype not in TORCH_TYPES]
        if unknown:
            raise UserError(f"{role}.onnx: {unknown[0]} has a dtype this runtime does not bind; re-export the folder")
        self.inputs = {t.name: self._bound(t.dtype) for t in self.signature.inputs}
        self.outputs = {t.name: t for t in self.signature.outputs}
        self.widths = {t.name: [d for d in t.shape[2:] if isinstance(d, int)] for t in self.signature.outputs}
        if any(len(w) != len(t.shape) - 2 for w, t in zip(self.widths.values(), self.signature.outputs, strict=True)):
            raise UserError(f"{role}.onnx: an output has a symbolic width; re-export the folder")
        self.in_place = any(n.startswith(PRESENT_PREFIXES) for n in self.outputs)  # ort_cache_in_place.py
        self.hidden_name = next((n for n in self.outputs if n.startswith("hidden")), None)
        if "logits" not in self.outputs or self.hidden_name is None:
            raise UserError(f"{role}.onnx: outputs {list(self.outputs)} lack logits/hidden; re-export the folder")

    def _bound(self, dtype: str) -> torch.dtype:
        """The torch dtype bound for a signature dtype (half types as float32 when computed in float32)."""
        bound = TORCH_TYPES[dtype]
        return torch.float32 if self.float_compute and bound in (torch.bfloat16, torch.float16) else bound

    def run(
        self, feeds: dict[str, torch.Tensor], q: tuple[int, int], aliases: dict[str, str] | None = None
    ) -> dict[str, torch.Tensor]:
        """feeds: every input by name; q = (batch, new tokens); `aliases`: outputs bound onto the buffer of
        an input (output -> input name). Returns every output by name."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise UserError(f"{self.role}.onnx expects inputs {missing} this runtime does not provide; re-export")
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        keep: list[Any] = []
        bound: dict[str, torch.Tensor] = {}
        for name, dtype in self.inputs.items():
            tensor = feeds[name].to(dtype).contiguous()  # no copy when it already is (the cache buffers)
            if tensor.numel() == 0:  # an empty past: let onnxruntime own the (zero-byte) buffer
                ort_value = _empty_ortvalue(tensor, kind, index)
                keep.append(ort_value)
                binding.bind_ortvalue_input(name, ort_value)
                continue
            keep.append(tensor)
            bound[name] = tensor
            binding.bind_input(name, kind, index, ONNX_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        outputs: dict[str, torch.Tensor] = {}
        for name, info in self.outputs.items():
            alias = (aliases or {}).get(name)
            if alias is not None:
                out = bound[alias]
                outputs[name] = out
                binding.bind_output(name, kind, index, ONNX_TYPES[out.dtype], list(out.shape), out.data_ptr())
                continue
            shape = [*q, *self.widths[name]]
            out = torch.empty(shape, dtype=self._bound(info.dtype), device=self.device)
            outputs[name] = out
            binding.bind_output(name, kind, index, ONNX_TYPES[out.dtype], shape, out.data_ptr())
        if kind == "cuda":
            torch.cuda.synchronize()  # torch wrote the inputs on its own stream
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs


def _empty_ortvalue(tensor: torch.Tensor, kind: str, index: int) -> Any:
    ort = import_ort()

    return ort.OrtValue.ortvalue_from_shape_and_type(list(tensor.shape), ONNX_TYPES[tensor.dtype], kind, index)


class OrtEngine:
    """The Engine protocol over an export folder (see engine.py). `roles` with "mtp" opens every MTP graph."""

    def __init__(
        self,
        folder: Path,
        device: Device = "cpu",
        threads: int = 0,
        roles: Sequence[str] = ("prefill", "decode", "mtp"),
    ):
        manifest = read_manifest(folder)
        if manifest.weights == "none":
            raise UserError(
                f"{folder}: exported with --weights none (no {manifest.weights_file}); re-export with weights, "
                "or fill it with random weights: python bench/fill_random_weights.py FOLDER"
            )
        self.manifest = manifest
        self.config = DeepseekV3Config.from_dict(manifest.config)
        self.device = torch.device(resolve_device(device))
        self.dtype = TORCH_TYPES.get(manifest.cache.dtype, torch.float32)
        listed = [r for r, f in manifest.graphs.items() if f]
        present = [r for r in roles if r in listed] + (mtp_roles(listed)[1:] if "mtp" in roles else [])
        self.graphs = {r: OrtGraph(manifest, r, device, threads, self.device) for r in present}
        if any(g.float_compute for g in self.graphs.values()):
            self.dtype = torch.float32  # the cache too: the graphs read and write it in float32
        self.mtp_depth = len(mtp_roles(self.graphs)) if manifest.cache.mtp_layers > 0 else 0
        self.has_mtp = self.mtp_depth > 0
        c = manifest.cache
        self.cache_shape = CacheShape(c.layers, c.ckv_width, c.kpe_width, self.dtype)
        self.cache: LatentBuffers | None = None
        self.mtp_caches: list[LatentBuffers] = []  # one one-layer cache per MTP graph

    def start(self, batch: int, capacity: int) -> None:
        self.cache, self.mtp_caches = self.cache_shape.allocate(batch, capacity, self.device, False)[0], []
        for _ in range(self.mtp_depth):
            one = CacheShape(1, self.cache_shape.ckv_width, self.cache_shape.kpe_width, self.dtype)
            self.mtp_caches.append(one.allocate(batch, capacity, self.device, False)[0])

    def cache_bytes_per_token(self) -> int:
        return self.cache_shape.bytes_per_token

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> StepOutput:
        return self._step(
            "prefill", self._need(self.cache), {"input_ids": ids, "positions": positions}, positions, False
        )

    def decode(self, ids: torch.Tensor, positions: torch.Tensor) -> StepOutput:
        return self._step("decode", self._need(self.cache), {"input_ids": ids, "positions": positions}, positions, True)

    def mtp(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, depth: int = 0) -> StepOutput:
        if not 0 <= depth < self.mtp_depth:
            raise UserError(f"{self.manifest.folder}: this export has {self.mtp_depth} MTP graphs, not {depth + 1}")
        if depth >= len(self.mtp_caches):
            raise RuntimeError("start() must be called before running a graph")
        feeds = {"next_ids": next_ids, "hidden": hidden.to(self.dtype), "positions": positions}
        return self._step(mtp_role(depth), self.mtp_caches[depth], feeds, positions, True)

    def _step(
        self, role: str, cache: LatentBuffers, feeds: dict[str, torch.Tensor], positions: torch.Tensor, past: bool
    ) -> StepOutput:
        graph = self.graphs[role]
        cache.reserve(int(positions.max()) + 1)
        in_place = past and graph.in_place
        views = self._past(cache, positions, in_place) if past else {}
        feeds.update(views)
        aliases = {present_name(n): n for n in views} if in_place else {}
        out = graph.run(feeds, (positions.shape[0], positions.shape[1]), aliases)
        for present, name in aliases.items():
            if out[present].data_ptr() != views[name].data_ptr():  # bound a converted copy: store it back
                views[name].copy_(out[present])
        if not in_place:
            for i in range(len(cache.ckv)):
                cache.write(i, out[f"new_ckv.{i}"], out[f"new_kpe.{i}"], positions)
        assert graph.hidden_name is not None
        return StepOutput(out["logits"], out[graph.hidden_name])

    @staticmethod
    def _past(cache: LatentBuffers, positions: torch.Tensor, in_place: bool = False) -> dict[str, torch.Tensor]:
        """Whole buffers as the past; with one row its valid prefix is contiguous, so bind just that (and,
        for a graph that writes the cache in place, the slots it writes)."""
        used = int(positions.max()) + 1 if in_place else int(positions[:, 0].max())
        cut = used if cache.batch == 1 or used == 0 else cache.capacity
        past = {}
        for i, (ckv, kpe) in enumerate(zip(cache.ckv, cache.kpe, strict=True)):
            past[f"past_ckv.{i}"], past[f"past_kpe.{i}"] = ckv[:, :cut], kpe[:, :cut]
        return past

    def _need(self, cache: LatentBuffers | None) -> LatentBuffers:
        if cache is None:
            raise RuntimeError("start() must be called before running a graph")
        return cache


class OrtBackend(EngineBackend):
    """The generation loop's LogitsModel over an export folder."""

    def __init__(self, folder: Path, device: Device = "cpu", threads: int = 0):
        super().__init__(OrtEngine(folder, device, threads))
