"""The bytes a benchmark step must read and the memory bandwidth they are read at: the floor a memory-bound
decode step cannot beat (bytes / bandwidth).

Weight bytes per call: for PyTorch and transformers from the checkpoint's shapes at the model's dtype
(`weight_bytes_per_step`), for onnxruntime from the graph's weights as stored (an 8-bit weight is 1 byte, its
scales count too: `graph_weight_bytes`). Bandwidth: the best of a few large copies (read + write bytes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from dsv3c.artifact.manifest import Manifest
from dsv3c.models.checkpoint_layout import parameter_shapes
from dsv3c.models.config import DeepseekV3Config

_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.")


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
    stacked weights whose names hold `.experts.` (the shared experts stacked after them count as dense)."""
    proto = manifest.load_structure(role)
    routed = DeepseekV3Config.from_dict(manifest.config).n_routed_experts or 0
    embed, experts, dense = 0, 0, 0
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue  # small constants inline in the graph file
        nbytes = math.ceil(math.prod(t.dims) * ir.DataType(t.data_type).bitwidth / 8)
        if "embed_tokens" in t.name:
            embed += nbytes
        elif ".experts." in t.name:
            # the ort lowering may stack the shared experts after the routed ones (passes/shared_experts.py):
            # those are read at every step, like the dense weights
            stacked = t.dims[0] if t.dims else routed
            part = nbytes * routed // stacked if routed and stacked > routed else nbytes
            experts += part
            dense += nbytes - part
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
