"""Write Hugging Face DeepSeek-V3 checkpoints (fp32, bf16 or DeepSeek's block fp8) and make random ones.

A save writes config.json and safetensors under checkpoint names (MTP mapped back, a tied lm_head left
out) into a temporary sibling folder, renamed into place at the end: nothing is ever half-written.
Which tensors become fp8 is decided in checkpoint_layout; quantization is fp8.py's, which gives back
the same bytes for weights loaded from an fp8 checkpoint in float32.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from dsv3c.artifact.atomic import atomic_folder, write_checkpoint_marker
from dsv3c.errors import CheckpointError
from dsv3c.models.checkpoint_layout import (
    BIAS_FP32,
    CONFIG_FILE,
    INDEX_FILE,
    SCALE_SUFFIX,
    SINGLE_FILE,
    CheckpointDtype,
    assign_parameter,
    block_of,
    checkpoint_name,
    copy_source,
    finish_model,
    parameter_shapes,
    stored_bytes,
    stored_dtype,
)
from dsv3c.models.config import DeepseekV3Config, Fp8Quantization
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3c.models.fp8 import FP8_DTYPE, Block, quantize_block_fp8
from safetensors.torch import save_file

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # Hugging Face's default shard size


def save_model(
    model: DeepseekV3ForCausalLM,
    path: str | Path,
    dtype: CheckpointDtype = "fp32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    *,
    overwrite: bool = False,
) -> None:
    """Write config.json and safetensors (sharded with an index above max_shard_bytes) into `path`.

    Everything goes to a temporary sibling folder first, renamed into place at the end; with
    `overwrite`, an existing `path` that dsv3c wrote (its `.dsv3c` marker) is replaced as a whole.
    """
    if dtype not in ("fp32", "bf16", "fp8"):
        raise ValueError(f"save_model: dtype must be 'fp32', 'bf16' or 'fp8', got {dtype!r}")
    target = Path(path)
    _check_target(target, overwrite)
    config = model.config
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards = _plan_shards(state, dtype, block_of(config), max_shard_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(target, overwrite or target.is_dir()) as tmp:  # only over a folder dsv3c wrote, or an empty one
        _output_config(config, dtype).save(tmp / CONFIG_FILE)
        _write_shards(state, shards, tmp, config, dtype)
        write_checkpoint_marker(tmp, "dsv3c save_model")


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a folder; choose a folder path to save into")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CheckpointError(f"{target}: folder exists and is not empty; choose a new one or pass overwrite=True")


def _output_config(config: DeepseekV3Config, dtype: CheckpointDtype) -> DeepseekV3Config:
    quantization = Fp8Quantization(block_of(config)) if dtype == "fp8" else None
    extra = {**config.extra, "torch_dtype": "float32" if dtype == "fp32" else "bfloat16"}
    return config.replace(quantization_config=quantization, extra=extra)


def _plan_shards(
    state: dict[str, torch.Tensor], dtype: CheckpointDtype, block: Block, max_bytes: int
) -> list[list[str]]:
    """Our names grouped into shards of at most max_bytes (a larger single tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = stored_bytes(name, tuple(tensor.shape), dtype, block)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_shards(
    state: dict[str, torch.Tensor],
    shards: list[list[str]],
    folder: Path,
    config: DeepseekV3Config,
    dtype: CheckpointDtype,
) -> None:
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = _shard_tensors(state, names, config, dtype)
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        os.chmod(folder / file, 0o644)  # safetensors writes 0600; checkpoints are usually shared read-only
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _shard_tensors(
    state: dict[str, torch.Tensor], names: list[str], config: DeepseekV3Config, dtype: CheckpointDtype
) -> dict[str, torch.Tensor]:
    """One shard's tensors under checkpoint names, converted; none shares memory with another."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name in names:
        key, tensor, stored = checkpoint_name(name, config), state[name].detach(), stored_dtype(name, dtype)
        if stored == FP8_DTYPE:
            out[key], out[key + SCALE_SUFFIX] = quantize_block_fp8(tensor, block_of(config))
            continue
        tensor = tensor.to(stored).contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()  # safetensors refuses shared storage (e.g. an MTP head sharing lm_head)
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def init_random(config: DeepseekV3Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> DeepseekV3ForCausalLM:
    """A model with random_state's weights (the router bias stays float32), built on meta and assigned."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    for name, tensor in random_state(config, seed):
        assign_parameter(model, name, tensor if name.endswith(BIAS_FP32) else tensor.to(dtype))
    return finish_model(model)


def random_state(config: DeepseekV3Config, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random weights, float32, one tensor at a time (a tied lm_head left out).

    N(0, initializer_range) for matrices and the router bias (so the selection-only bias matters), ones
    for norms, zeros for Linear biases; MTP embed / head are copies of the main ones.
    """
    std = float(config.extra.get("initializer_range", 0.02))
    shapes = parameter_shapes(config)
    for name in shapes:
        source = copy_source(name, config) or name
        yield name, random_tensor(source, shapes[source], seed, std)


def random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """One parameter of random_state, from its own generator seeded by (seed, name): same seed, same bytes."""
    if name.endswith("norm.weight"):  # every RMSNorm weight, and nothing else, is named *norm.weight
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape).normal_(0.0, std, generator=generator)
