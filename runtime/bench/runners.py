"""What the benchmark runs: one small adapter per runtime.

A runner prefills a batch of random prompts (in chunks of at most `chunk` tokens, so that a long context
fits in memory: the first chunk through the prefill graph, the rest through decode over the past) and then
decodes one token per row per step. Runners own their cache; `cache_bytes_per_token` is measured from it.
`step_weight_bytes(tokens)` is what one call must read of the weights (memory.py counts them).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from dsv3c.models.config import DeepseekV3Config
from dsv3c.runtime.bench.memory import graph_weight_bytes, weight_bytes_per_step
from dsv3c.runtime.engine import Engine


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


def runner_factories(
    checkpoint: Path, folder: Path, device: Literal["cpu", "cuda"], threads: int
) -> dict[str, Callable[[], Runner]]:
    """One loader per runtime (called one at a time by run_bench): onnxruntime over the export `folder`
    (counting its weights as stored), our PyTorch model and transformers over `checkpoint`."""
    from dsv3c.models.checkpoint import load_model
    from dsv3c.runtime.ort_backend import OrtEngine
    from dsv3c.runtime.torch_backend import TorchEngine

    if threads:
        torch.set_num_threads(threads)

    def ort() -> Runner:
        engine = OrtEngine(folder, device, threads, roles=("prefill", "decode"))
        return EngineRunner("ort", engine, engine.dtype.itemsize, graph_weight_bytes(engine.manifest))

    def eager() -> Runner:
        return EngineRunner("torch", TorchEngine(load_model(checkpoint).to(device)), 4)

    def transformers() -> Runner:
        return TransformersRunner(checkpoint, device)

    return {"ort": ort, "torch": eager, "transformers": transformers}
