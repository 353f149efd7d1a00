"""Decode steps replayed as one CUDA graph by onnxruntime's CUDA EP, one capture per (batch, capacity) bucket.

A captured graph replays the same kernels on the same addresses, so everything a decode step touches is
allocated and bound once per bucket:

- the session's symbolic dimensions are fixed (free-dimension overrides: batch, past = capacity, q = 1),
  so onnxruntime folds every shape computation to a constant at load and every node can run on the CUDA
  EP (a node left on the CPU, or a host copy between them, makes onnxruntime refuse the capture); the
  Transposes that at q = 1 move only dimensions of size 1 are given to onnxruntime as Reshapes, views
  instead of copies (onnxkit/static_transposes.py), and its one-row RMSNorms as skip-RMSNorms with a zero
  skip, whose CUDA kernel is the faster one (onnxkit/zero_skip_norms.py);
- the latent cache is a fixed-capacity LatentBuffers bound whole as the past (the graph masks slots at and
  beyond positions[b, 0]), and the step's ids and positions are device tensors updated in place;
- the new cache entries come back in bound outputs (views of one tensor per kind) and are scattered into
  the buffers by torch, two scatters for all layers, on the same stream that onnxruntime computes on
  (`user_compute_stream`); a graph of `lower --target ort` (`--decode-cache in-place`) writes them
  itself into the buffers, its present outputs bound onto the past inputs (passes/ort_cache_in_place.py);
  the run skips onnxruntime's end-of-run synchronization (`disable_synchronize_execution_providers`): a
  step never waits for the host.

On a CPU (or with `cuda_graph=False`) the same static-shape session runs without capture: the tests
compare its steps with the dynamic-shape OrtEngine, and the benchmark isolates what the capture gains.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from dsv3c.artifact.export_folder import check_external_data
from dsv3c.artifact.manifest import Manifest, read_manifest
from dsv3c.artifact.names import PRESENT_PREFIXES, present_name
from dsv3c.errors import UserError
from dsv3c.onnxkit.session import SessionSetup, import_ort, open_session
from dsv3c.onnxkit.static_transposes import transposes_as_reshapes
from dsv3c.onnxkit.zero_skip_norms import norms_with_zero_skip
from dsv3c.runtime.latent_buffers import CacheShape, LatentBuffers
from dsv3c.runtime.ort_backend import ONNX_TYPES, TORCH_TYPES


@dataclass
class Placement:
    """Where the nodes of one run executed (onnxruntime's profile: one event per node and run)."""

    by_provider: dict[str, int] = field(default_factory=dict)  # provider -> nodes
    off_device: dict[str, int] = field(default_factory=dict)  # op type -> nodes not on the asked-for EP

    def to_dict(self) -> dict[str, Any]:
        return {"by_provider": self.by_provider, "off_device": self.off_device}


def node_events(path: Path) -> dict[str, tuple[str, str]]:
    """The nodes an onnxruntime profile saw run: node name -> (execution provider, op type)."""
    seen: dict[str, tuple[str, str]] = {}
    for e in json.loads(path.read_text()):
        args = e.get("args", {})
        if e.get("cat") == "Node" and "provider" in args and e.get("name", "").endswith("_kernel_time"):
            seen[e["name"][: -len("_kernel_time")]] = (args["provider"], args.get("op_name", "?"))
    return seen


def placement_from_profile(path: Path, provider: str) -> Placement:
    """Count the node events of an onnxruntime profile (one run) by execution provider."""
    seen = node_events(path)
    by_provider = Counter(p for p, _ in seen.values())
    off = Counter(op for p, op in seen.values() if p != provider)
    return Placement(dict(by_provider), dict(off))


class StaticDecoder:
    """The decode graph of an export folder at one (batch, capacity), bound once; `step` runs one token per row."""

    def __init__(
        self,
        folder: Path,
        batch: int,
        capacity: int,
        *,
        device: str = "cuda",
        cuda_graph: bool = True,
        profile: bool = False,
        threads: int = 0,
        warmup_runs: int = 6,
        memory_pattern: bool = True,
        cuda_extra: dict[str, str] | None = None,
        per_layer_writes: bool = False,  # the old way, one scatter per layer and kind (for benchmarks)
        reshape_transposes: bool = True,  # False keeps the size-1 Transposes as copies (for benchmarks)
        zero_skip_norms: bool = True,  # False keeps the one-row RMSNorms as they are (for benchmarks)
    ):
        ort = import_ort()
        self.manifest: Manifest = read_manifest(folder)
        if self.manifest.weights == "none":
            raise UserError(f"{folder}: exported with --weights none; fill it first (bench/fill_random_weights.py)")
        c = self.manifest.cache
        dtype = TORCH_TYPES.get(c.dtype, torch.float32)
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream() if self.device.type == "cuda" else None
        self.cache: LatentBuffers = CacheShape(c.layers, c.ckv_width, c.kpe_width, dtype).allocate(
            batch, capacity, self.device, mtp=False
        )[0]
        self.batch, self.capacity = batch, self.cache.capacity  # capacity rounded up to whole chunks
        self.provider = "CUDAExecutionProvider" if self.device.type == "cuda" else "CPUExecutionProvider"
        cuda: dict[str, str] = {}
        if self.stream is not None:
            cuda = {
                "enable_cuda_graph": "1" if cuda_graph else "0",
                "user_compute_stream": str(self.stream.cuda_stream),
                **(cuda_extra or {}),
            }
        fixed = {"batch": batch, "past": self.capacity, "q": 1}
        path = self.manifest.graph_path("decode")
        setup = SessionSetup(
            device="cuda" if self.device.type == "cuda" else "cpu",
            threads=threads,
            weights_folder=path.parent,
            fixed_dims=fixed,
            cuda_options=cuda,
            memory_pattern=memory_pattern,
            profile_prefix=str(Path(os.environ.get("TMPDIR", "/tmp")) / "dsv3c-placement") if profile else None,
        )
        check_external_data(path)
        model = onnx.load(path, load_external_data=False)  # the graph alone; onnxruntime reads the weights
        self.reshaped_transposes = transposes_as_reshapes(model, fixed) if reshape_transposes else 0
        self.zero_skip_norms = norms_with_zero_skip(model, fixed) if zero_skip_norms else 0
        self.session = open_session(
            model.SerializeToString(), setup, label=str(path), what="this graph as a static decode step"
        )
        self.profiling, self.per_layer_writes = profile, per_layer_writes
        signature = self.manifest.signatures["decode"]
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        inputs: dict[str, torch.Tensor] = {"input_ids": self.ids, "positions": self.positions}
        for i, (ckv, kpe) in enumerate(zip(self.cache.ckv, self.cache.kpe, strict=True)):
            inputs[f"past_ckv.{i}"], inputs[f"past_kpe.{i}"] = ckv, kpe
        missing = [t.name for t in signature.inputs if t.name not in inputs]
        if missing:
            raise UserError(f"{path}: inputs {missing} are not a decode step's; re-export the folder")
        self.in_place = any(t.name.startswith(PRESENT_PREFIXES) for t in signature.outputs)
        self.outputs = {
            t.name: torch.empty(
                [batch, 1, *(d for d in t.shape[2:] if isinstance(d, int))],
                dtype=TORCH_TYPES[t.dtype],
                device=self.device,
            )
            for t in signature.outputs
            if not t.name.startswith(PRESENT_PREFIXES)
        }
        layers = len(self.cache.ckv)
        if self.in_place:  # the graph writes the cache: its present outputs are the past buffers themselves
            for name in [n for n in inputs if n.startswith("past_")]:
                self.outputs[present_name(name)] = inputs[name]
        else:  # the new entries land in views of one tensor per kind, so one scatter per kind stores them all
            self.new_ckv = torch.empty(layers, batch, 1, c.ckv_width, dtype=self.cache.dtype, device=self.device)
            self.new_kpe = torch.empty(layers, batch, 1, c.kpe_width, dtype=self.cache.dtype, device=self.device)
            self.rows = torch.arange(batch, device=self.device)[:, None]
            for i in range(layers):
                for name, stacked in ((f"new_ckv.{i}", self.new_ckv), (f"new_kpe.{i}", self.new_kpe)):
                    out = self.outputs.get(name)
                    if out is None or out.shape != stacked[i].shape or out.dtype != stacked.dtype:
                        raise UserError(f"{path}: output {name} is not a decode step's new cache entry; re-export")
                    self.outputs[name] = stacked[i]
        unknown = [t.name for t in signature.outputs if t.name not in self.outputs]
        if unknown:
            raise UserError(f"{path}: outputs {unknown} are not a decode step's; re-export the folder")
        self.binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        for name, tensor in inputs.items():
            self.binding.bind_input(name, kind, index, ONNX_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        for name, tensor in self.outputs.items():
            self.binding.bind_output(name, kind, index, ONNX_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        self.run_options = ort.RunOptions()
        if self.device.type == "cuda":
            self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the buffers were written on torch's default stream
        if self.stream is not None and cuda_graph:
            self._warm_up(ort, warmup_runs)

    def _warm_up(self, ort: Any, runs: int) -> None:
        """Runs without capture (gpu_graph_id -1) before the first captured one, so that the arena holds
        every buffer a step needs: a cudaMalloc inside the capture makes it fail ("Failed to allocate
        memory" at batch 32 on the H200). Two runs were enough for `small`, not for V2-Lite at batch 32;
        six were (bench/capture_variants.py: the memory pattern off or the arena grown as requested were
        not; bench/results/capture_variants_v2-lite_b32_h200_2026-12-02b.json). A graph that writes its cache
        in place writes slot 0 of every row in these runs (positions 0): a step at position 0 overwrites it."""
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", "-1")
        options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            for _ in range(runs):
                self.session.run_with_iobinding(self.binding, options)
        self.stream.synchronize()

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids, positions [B, 1] (on the device): one token per row at positions[b, 0]; returns the logits
        [B, 1, vocab] (a buffer the next step overwrites). No host synchronization on CUDA."""
        if int(positions.shape[0]) != self.batch:
            raise UserError(f"this decoder was built for batch {self.batch}, not {positions.shape[0]}")
        if self.stream is None:
            self._run(ids, positions)
            return self.outputs["logits"]
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)  # device-side waits (events), never the host
        with torch.cuda.stream(self.stream):
            self._run(ids, positions)
        caller.wait_stream(self.stream)
        return self.outputs["logits"]

    def _run(self, ids: torch.Tensor, positions: torch.Tensor) -> None:
        self.ids.copy_(ids, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.session.run_with_iobinding(self.binding, self.run_options)
        if self.in_place:
            return
        if self.per_layer_writes:
            for i in range(len(self.cache.ckv)):
                self.cache.write(i, self.new_ckv[i], self.new_kpe[i], self.positions)
        else:
            self.cache.write_layers(self.new_ckv, self.new_kpe, self.positions, self.rows)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def placement(self) -> Placement:
        """Where the nodes ran (needs profile=True; ends the profile): the captured replays run no nodes of
        their own, so this counts the runs before capture."""
        if not self.profiling:
            raise RuntimeError("bug: placement() needs a decoder made with profile=True")
        self.profiling = False
        return placement_from_profile(Path(self.session.end_profiling()), self.provider)
