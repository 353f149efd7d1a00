"""What the benchmark runs: one small adapter per runtime, and the bytes a step must read.

A runner prefills a batch of random prompts (in chunks of at most `chunk` tokens, so that a long context
fits in memory: the first chunk through the prefill graph, the rest through decode over the past) and then
decodes one token per row per step. Runners own their cache; `cache_bytes_per_token` is measured from it.
`step_weight_bytes(tokens)` is what one call must read of the weights: for PyTorch and transformers from the
checkpoint's shapes at the model's dtype, for onnxruntime from the graph's weights as stored (an 8-bit
weight is 1 byte, its scales count too: `graph_weight_bytes`).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnx_ir as ir
import torch
from dsv3c.artifact.manifest import Manifest
from dsv3c.models.checkpoint_layout import parameter_shapes
from dsv3c.models.config import DeepseekV3Config
from dsv3c.runtime.engine import Engine

_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.")


class Runner(Protocol):
    name: str
    config: DeepseekV3Config
    weight_itemsize: int

    def prefill(self, ids: torch.Tensor, chunk: int, reserve: int) -> None:
        """Fill the cache with ids [B, S] from position 0; room for `reserve` more tokens per row."""
        ...

    def decode(self, ids: torch.Tensor) -> None:
        """One token per row [B, 1] at the next position."""
        ...

    def cache_bytes_per_token(self) -> int: ...

    def step_weight_bytes(self, tokens: int) -> int:
        """Weight bytes one call over `tokens` tokens (all rows) must read."""
        ...


class EngineRunner:
    """Our runtimes (onnxruntime, PyTorch) through the Engine protocol; `weight_bytes` (tokens -> bytes)
    replaces the checkpoint-shape count at `weight_itemsize` (e.g. `graph_weight_bytes` for onnxruntime)."""

    def __init__(
        self, name: str, engine: Engine, weight_itemsize: int, weight_bytes: Callable[[int], int] | None = None
    ):
        self.name, self.engine, self.config = name, engine, engine.config
        self.weight_itemsize = weight_itemsize
        self.weight_bytes = weight_bytes
        self.position = 0

    def step_weight_bytes(self, tokens: int) -> int:
        if self.weight_bytes is not None:
            return self.weight_bytes(tokens)
        return weight_bytes_per_step(self.config, tokens, self.weight_itemsize)

    def prefill(self, ids: torch.Tensor, chunk: int, reserve: int) -> None:
        batch, seq = ids.shape
        self.engine.start(batch, seq + reserve)
        ids = ids.to(self.engine.device)
        for start in range(0, seq, chunk):
            part = ids[:, start : start + chunk]
            positions = torch.arange(start, start + part.shape[1], device=ids.device).expand(batch, -1).contiguous()
            step = self.engine.prefill if start == 0 else self.engine.decode
            step(part.contiguous(), positions)
        self.position = seq

    def decode(self, ids: torch.Tensor) -> None:
        positions = torch.full_like(ids, self.position)
        self.engine.decode(ids.to(self.engine.device), positions.to(self.engine.device))
        self.position += 1

    def cache_bytes_per_token(self) -> int:
        return self.engine.cache_bytes_per_token()


class TransformersRunner:
    """transformers' DeepseekV3ForCausalLM, eager attention and eager experts, with its DynamicCache."""

    name = "transformers"

    def __init__(self, checkpoint: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        try:
            import transformers
        except ImportError:
            raise ImportError("transformers is not installed (pip install 'dsv3c[bench]')") from None
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "eager", "experts_implementation": "eager"}
        with _quiet_transformers(transformers):
            model: Any = transformers.DeepseekV3ForCausalLM
            self.model = model.from_pretrained(str(checkpoint), **kwargs)
        self.model = self.model.to(device).eval()
        self.device = torch.device(device)
        self.config = DeepseekV3Config.from_json(checkpoint / "config.json")
        self.weight_itemsize = dtype.itemsize
        self.cache: Any = None
        self.seen, self.batch = 0, 1
        # transformers 5.2x renamed past_key_values to cache (input and output); accept either
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def step_weight_bytes(self, tokens: int) -> int:
        return weight_bytes_per_step(self.config, tokens, self.weight_itemsize)

    def _step(self, ids: torch.Tensor) -> None:
        out = self.model(input_ids=ids, use_cache=True, **{self.cache_arg: self.cache})
        self.cache = out.get(self.cache_arg)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, chunk: int, reserve: int) -> None:
        self.cache, self.seen = None, 0
        ids = ids.to(self.device)
        for start in range(0, ids.shape[1], chunk):
            self._step(ids[:, start : start + chunk])
        self.seen, self.batch = ids.shape[1], ids.shape[0]

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor) -> None:
        self._step(ids.to(self.device))
        self.seen += 1

    def cache_bytes_per_token(self) -> int:
        """Measured from the cache object: every key and value tensor, per row and token."""
        layers = getattr(self.cache, "layers", None)
        if not layers or not self.seen:
            return 0
        total = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
        return total // (self.batch * self.cache.get_seq_length())


class _quiet_transformers:
    """Silence transformers' load report (unexpected MTP tensors are expected: it has no MTP module)."""

    def __init__(self, transformers: Any):
        self.logging = transformers.utils.logging

    def __enter__(self) -> None:
        self.level = self.logging.get_verbosity()
        self.logging.set_verbosity_error()
        self.logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        self.logging.set_verbosity(self.level)
        self.logging.enable_progress_bar()


def weight_bytes_per_step(config: DeepseekV3Config, tokens: int, itemsize: int) -> int:
    """Weight bytes one main-model call over `tokens` tokens must read: every dense weight once, the
    embedding rows it looks up, and the routed experts it can reach (at most tokens x top-k of them)."""
    experts = config.n_routed_experts or 0
    reached = min(experts, tokens * (config.num_experts_per_tok or 0))
    total = 0
    for name, shape in parameter_shapes(config).items():
        size = math.prod(shape)
        if name.startswith("mtp."):
            continue
        if name == "model.embed_tokens.weight":
            size = min(tokens, shape[0]) * shape[1]
        elif _EXPERT.match(name):
            size = size * reached // max(experts, 1)  # summed over all experts: scale to those reached
        total += size * itemsize
    return total


def stored_weight_bytes(manifest: Manifest, role: str = "decode") -> tuple[int, int, int]:
    """(dense, embedding, routed experts) bytes of an export's `role` graph, every weight as stored (its
    dtype's size: 4 for float32, 1 for fp8 or 8-bit integers, plus their scales); routed experts are the
    stacked weights whose names hold `.experts.`."""
    proto = manifest.load_structure(role)
    embed, experts, dense = 0, 0, 0
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue  # small constants inline in the graph file
        nbytes = math.ceil(math.prod(t.dims) * ir.DataType(t.data_type).bitwidth / 8)
        if "embed_tokens" in t.name:
            embed += nbytes
        elif ".experts." in t.name:
            experts += nbytes
        else:
            dense += nbytes
    return dense, embed, experts


def graph_weight_bytes(manifest: Manifest, role: str = "decode") -> Callable[[int], int]:
    """Weight bytes per call read from an export's `role` graph (stored_weight_bytes): the dense weights,
    the embedding rows looked up, and the routed experts scaled to those reachable (at most tokens x top-k)."""
    config = DeepseekV3Config.from_dict(manifest.config)
    dense, embed, experts = stored_weight_bytes(manifest, role)
    n_experts, top_k, vocab = config.n_routed_experts or 0, config.num_experts_per_tok or 0, config.vocab_size

    def per_step(tokens: int) -> int:
        reached = min(n_experts, tokens * top_k)
        return dense + embed * min(tokens, vocab) // vocab + experts * reached // max(n_experts, 1)

    return per_step


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s from a large numpy copy (read + write bytes, best of `repeats`)."""
    import time

    src = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def device_bandwidth(megabytes: int = 1024, repeats: int = 10) -> float:
    """CUDA device memory bandwidth in bytes/s from a large on-device copy (read + write bytes, best of)."""
    src = torch.ones(megabytes * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / best
