"""What a DeepSeek-V3 Hugging Face checkpoint holds: tensor names, stored dtypes, shapes and sizes.

Names: our state_dict keys are checkpoint names, except MTP module k: `mtp.{k}.block.X` is stored as
`model.layers.{num_hidden_layers + k}.X` and `mtp.{k}.Y` (embed_tokens, enorm, hnorm, eh_proj,
shared_head.*) as `model.layers.{num_hidden_layers + k}.Y`.

Stored dtypes (DeepSeek-V3 README_WEIGHTS.md: E4M3 weights, one float32 `<name>_scale_inv` per 128x128
block). An fp8 checkpoint stores as block fp8 the 2-D weights of the attention projections and of every
SwiGLU MLP (dense, routed and shared experts, the MTP block's included). These stay bf16, as in
DeepSeek's release: embed_tokens, lm_head, norms, the router `mlp.gate.weight`, and the MTP `eh_proj`
and `shared_head.head` (vLLM's deepseek_mtp.py builds eh_proj as a plain nn.Linear and the head as an
unquantized ParallelLMHead, so the released checkpoint has no scale for them). `e_score_correction_bias`
stays float32 in every format, as released (vLLM PR 23640, transformers PR 42580): it decides routing.
"""

from __future__ import annotations

import re
import sys
from typing import Literal

import torch
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import DecoderLayer, DeepseekV3ForCausalLM, MTPModule
from dsv3c.models.fp8 import DEFAULT_BLOCK, FP8_DTYPE, Block, scale_shape
from dsv3c.models.rope import inv_frequencies
from torch import nn

CheckpointDtype = Literal["fp32", "bf16", "fp8"]
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
BIAS_FP32 = "e_score_correction_bias"

_FP8_WEIGHT = re.compile(
    r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
)
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)$")
_MTP = re.compile(r"mtp\.(\d+)\.(.+)$")
_MTP_OWN = ("embed_tokens.", "enorm.", "hnorm.", "eh_proj.", "shared_head.")


# ---- names --------------------------------------------------------------------------------------


def checkpoint_name(name: str, config: DeepseekV3Config) -> str:
    """Our state_dict key -> its checkpoint name."""
    m = _MTP.match(name)
    if m is None:
        return name
    return f"model.layers.{config.num_hidden_layers + int(m[1])}.{m[2].removeprefix('block.')}"


def module_name(name: str, config: DeepseekV3Config) -> str | None:
    """Checkpoint name -> our state_dict key; None for a layer beyond the configured MTP depth."""
    m = _LAYER.match(name)
    if m is None or int(m[1]) < config.num_hidden_layers:
        return name
    k, rest = int(m[1]) - config.num_hidden_layers, m[2]
    if k >= config.num_nextn_predict_layers:
        return None
    return f"mtp.{k}.{rest}" if rest.startswith(_MTP_OWN) else f"mtp.{k}.block.{rest}"


def layer_index(name: str) -> int | None:
    """i for a checkpoint name `model.layers.{i}.*` (MTP layers included), else None."""
    m = _LAYER.match(name)
    return None if m is None else int(m[1])


def is_fp8_weight(name: str) -> bool:
    """Whether an fp8 save stores this tensor (our or checkpoint name) as block fp8."""
    return _FP8_WEIGHT.search(name) is not None


def copy_source(name: str, config: DeepseekV3Config) -> str | None:
    """For an MTP tensor a checkpoint may leave out: the main-model tensor it copies."""
    m = _MTP.match(name)
    if m is None:
        return None
    if m[2] == "embed_tokens.weight":
        return "model.embed_tokens.weight"
    if m[2] == "shared_head.head.weight":
        return "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    return None


def parameter_shapes(config: DeepseekV3Config) -> dict[str, tuple[int, ...]]:
    """Our state_dict keys and shapes (a tied lm_head left out), from one meta layer per kind."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)}
    with torch.device("meta"):
        kinds: dict[bool, nn.Module] = {}
        for i in range(c.num_hidden_layers):
            moe = c.is_moe_layer(i)
            if moe not in kinds:
                kinds[moe] = DecoderLayer(c, i)
            shapes.update({f"model.layers.{i}.{n}": tuple(p.shape) for n, p in kinds[moe].named_parameters()})
        shapes["model.norm.weight"] = (c.hidden_size,)
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        for k in range(c.num_nextn_predict_layers):
            mtp = MTPModule(c, c.num_hidden_layers + k)
            shapes.update({f"mtp.{k}.{n}": tuple(p.shape) for n, p in mtp.named_parameters()})
    return shapes


# ---- stored form --------------------------------------------------------------------------------


def stored_dtype(name: str, dtype: CheckpointDtype) -> torch.dtype:
    """What one of our tensors is written as under a checkpoint dtype."""
    if dtype == "fp32" or name.endswith(BIAS_FP32):
        return torch.float32
    return FP8_DTYPE if dtype == "fp8" and is_fp8_weight(name) else torch.bfloat16


def stored_bytes(name: str, shape: tuple[int, ...], dtype: CheckpointDtype, block: Block) -> int:
    """Bytes of one of our tensors stored as `dtype` (fp8: its scales included)."""
    numel = int(torch.Size(shape).numel())
    kind = stored_dtype(name, dtype)
    if kind == FP8_DTYPE:
        rows, cols = scale_shape(shape, block)
        return numel + 4 * rows * cols
    return numel * kind.itemsize


def estimate_bytes(config: DeepseekV3Config, dtype: CheckpointDtype) -> int:
    """Bytes of the weights saved as `dtype`, fp8 scales included (fp32/bf16: also their size in memory)."""
    block = block_of(config)
    return sum(stored_bytes(n, shape, dtype, block) for n, shape in parameter_shapes(config).items())


def block_of(config: DeepseekV3Config) -> Block:
    q = config.quantization_config
    return q.weight_block_size if q is not None else DEFAULT_BLOCK


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def finish_model(model: DeepseekV3ForCausalLM) -> DeepseekV3ForCausalLM:
    """Re-tie the head, recompute the non-persistent RoPE buffer, check nothing was left on meta."""
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.register_buffer("inv_freq", inv_frequencies(model.config), persistent=False)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"bug: {len(left)} parameters were not loaded, e.g. {left[:3]}")
    return model


def assign_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace a (meta) parameter by `tensor` without copying, as load_state_dict(assign=True) does."""
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    old = getattr(module, leaf)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=old.requires_grad))
