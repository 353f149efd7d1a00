"""Load Hugging Face DeepSeek-V3 checkpoints (config.json plus safetensors, fp32/bf16/fp8).

Reads `model.safetensors`, shards listed by `model.safetensors.index.json` (`weight_map`), or failing
both every `*.safetensors` in the folder. Only safetensors are read (never pickles): every header is
checked first (names, shapes, fp8 scales), then tensors stream one shard at a time into a model built
on `meta`, so a large model is neither initialised nor held twice. Names and dtypes: checkpoint_layout.

Missing MTP embed_tokens / shared_head.head are copied from the main embedding / lm_head; a checkpoint
with no MTP tensor at all (transformers drops them) loads with num_nextn_predict_layers = 0 and a
warning. Tied embeddings need no lm_head.weight (one that is stored is ignored). Also ignored:
`*.rotary_emb.inv_freq`, and layers beyond the configured MTP depth (with a warning). Float8 tensors are
dequantized exactly (fp8.py) unless streamed with keep_fp8. Errors are CheckpointErrors naming the file.

Writing, random init and sizes live in checkpoint_save / checkpoint_layout and are re-exported here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
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
    estimate_bytes,
    finish_model,
    is_fp8_weight,
    layer_index,
    module_name,
    parameter_shapes,
    warn,
)
from dsv3c.models.checkpoint_save import init_random, random_state, save_model
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3c.models.fp8 import FP8_DTYPE, Block, dequantize_block_fp8, scale_shape
from safetensors import SafetensorError, safe_open

__all__ = [
    "CheckpointDtype",
    "CheckpointIndex",
    "StoredTensor",
    "checkpoint_name",
    "estimate_bytes",
    "init_random",
    "is_fp8_weight",
    "load_model",
    "load_state_dict_streaming",
    "module_name",
    "random_state",
    "read_index",
    "save_model",
]

_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")
_READABLE = ("F32", "F16", "BF16", "F8_E4M3")


@dataclass(frozen=True)
class StoredTensor:
    file: str
    dtype: str  # safetensors' name: "BF16", "F8_E4M3", ...
    shape: tuple[int, ...]


@dataclass
class CheckpointIndex:
    """A checked checkpoint folder: its config (MTP dropped when absent) and where each tensor is."""

    folder: Path
    config: DeepseekV3Config
    tensors: dict[str, StoredTensor]  # checkpoint name -> where and what
    names: dict[str, str] = field(default_factory=dict)  # our name -> checkpoint name, stored ones
    copies: dict[str, str] = field(default_factory=dict)  # our name -> our main tensor it copies

    @property
    def block(self) -> Block:
        return block_of(self.config)


def read_index(path: str | Path, config: DeepseekV3Config | None = None) -> CheckpointIndex:
    """Read config.json (unless given) and every shard header; check names, shapes and fp8 scales."""
    folder = _check_folder(Path(path))
    if config is None:
        if not (folder / CONFIG_FILE).is_file():
            raise CheckpointError(f"{folder}: no {CONFIG_FILE}; a Hugging Face checkpoint folder needs one")
        config = DeepseekV3Config.from_json(folder / CONFIG_FILE)
    tensors = _scan(folder)
    index = CheckpointIndex(folder, _resolve_mtp(config, tensors, folder), tensors)
    _match_names(index)
    return index


def load_state_dict_streaming(
    path: str | Path | CheckpointIndex,
    config: DeepseekV3Config | None = None,
    *,
    keep_fp8: bool = False,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) for every model tensor, shard by shard; checks everything before reading.

    fp8 tensors are dequantized to float32, or with keep_fp8 yielded unchanged followed by
    (`name + "_scale_inv"`, scales). `dtype` casts float tensors (the router bias stays float32).
    MTP embed/head absent from the checkpoint come last, copied from the main ones; a tied lm_head
    is not yielded.
    """
    index = path if isinstance(path, CheckpointIndex) else read_index(path, config)
    return _stream(index, keep_fp8, dtype)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> DeepseekV3ForCausalLM:
    """Load a checkpoint folder into a model built on `meta` (weights are never initialised twice)."""
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"load_model: dtype must be float32, bfloat16 or float16, got {dtype}")
    index = read_index(path)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(index.config)
    for name, tensor in _stream(index, keep_fp8=False, dtype=dtype):
        assign_parameter(model, name, tensor)
    return finish_model(model)


def _check_folder(folder: Path) -> Path:
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; pass the folder holding config.json and *.safetensors")
    return folder


def _shard_files(folder: Path) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files to read and, when sharded, the index's weight_map."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: not a safetensors index (a JSON object with a 'weight_map')")
        for file in set(weight_map.values()):  # a shard is a file of this folder, never a path out of it
            if Path(file).name != file or not file.isprintable() or not file.endswith(".safetensors"):
                raise CheckpointError(
                    f"{index_path}: shard {file!r} is not a .safetensors file name in the checkpoint folder"
                )
        return sorted(set(weight_map.values())), weight_map
    if (folder / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        hint = " (PyTorch pickles are not loaded: convert them to safetensors)" if any(folder.glob("*.bin")) else ""
        raise CheckpointError(f"{folder}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file{hint}")
    return files, None


@contextmanager
def _open(path: Path) -> Iterator[Any]:
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path}: unreadable safetensors ({e}); the file is truncated or corrupt, download it again"
        ) from None


def _scan(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor's file, dtype and shape, from the shard headers alone."""
    files, weight_map = _shard_files(folder)
    tensors: dict[str, StoredTensor] = {}
    for file in files:
        try:
            present = (folder / file).is_file()
        except OSError:  # a shard name too long for the file system: no such file can be in the folder
            present = False
        if not present:
            if weight_map is None:  # found by its name alone: a folder, or a link to nothing, called *.safetensors
                raise CheckpointError(f"{folder / file}: not a file; a checkpoint's shards are safetensors files")
            example = next(k for k, v in weight_map.items() if v == file)
            raise CheckpointError(
                f"{folder / INDEX_FILE}: shard {file} (holding e.g. {example!r}) is missing; download it"
            )
        with _open(folder / file) as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if weight_map is not None and weight_map.get(key) != file:
                    continue  # the index decides which copy counts
                if key in tensors:
                    raise CheckpointError(f"{folder}: tensor {key} is in both {tensors[key].file} and {file}")
                s = f.get_slice(key)
                tensors[key] = StoredTensor(file, s.get_dtype(), tuple(s.get_shape()))
    for key, file in (weight_map or {}).items():
        if key not in tensors:
            raise CheckpointError(f"{folder / INDEX_FILE}: maps {key!r} to {file!r}, which does not hold it")
    return tensors


def _resolve_mtp(config: DeepseekV3Config, tensors: dict[str, StoredTensor], folder: Path) -> DeepseekV3Config:
    n = config.num_hidden_layers
    if not config.num_nextn_predict_layers or any((layer_index(k) or 0) >= n for k in tensors):
        return config
    warn(f"{folder} holds no MTP weights (model.layers.{n}.*); loading without multi-token prediction")
    return config.replace(num_nextn_predict_layers=0)


def _match_names(index: CheckpointIndex) -> None:
    """Fill index.names / index.copies; raise on missing, unexpected or malformed tensors."""
    config, tensors = index.config, index.tensors
    expected = parameter_shapes(config)
    unexpected, beyond_mtp = [], 0
    for key, info in tensors.items():
        if (key.endswith(SCALE_SUFFIX) and key.removesuffix(SCALE_SUFFIX) in tensors) or _IGNORED.search(key):
            continue  # scales are checked with their weight
        ours = module_name(key, config)
        if ours is None:
            beyond_mtp += 1
        elif ours == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the embedding is the head
        elif ours not in expected:
            unexpected.append(key)
        else:
            _check_tensor(index, key, info, expected[ours])
            index.names[ours] = key
    for name in expected:
        source = copy_source(name, config)
        if name not in index.names and source is not None:
            index.copies[name] = source
    missing = [checkpoint_name(n, config) for n in expected if n not in index.names and n not in index.copies]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors the config needs are missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors have no place in the model (e.g. {', '.join(unexpected[:3])})")
    if problems:
        raise CheckpointError(f"{index.folder}: {'; '.join(problems)}; config.json does not match these weights")
    if beyond_mtp:
        k = config.num_nextn_predict_layers
        warn(f"{index.folder}: ignoring {beyond_mtp} tensors of MTP layers beyond num_nextn_predict_layers = {k}")


def _check_tensor(index: CheckpointIndex, key: str, info: StoredTensor, shape: tuple[int, ...]) -> None:
    where = f"{index.folder / info.file}: tensor {key}"
    if info.dtype not in _READABLE:
        raise CheckpointError(f"{where} is {info.dtype}; only F32, F16, BF16 and F8_E4M3 (with scales) are read")
    if info.shape != shape:
        raise CheckpointError(f"{where} has shape {list(info.shape)}, config.json implies {list(shape)}")
    scale = index.tensors.get(key + SCALE_SUFFIX)
    if info.dtype != "F8_E4M3":
        if scale is not None:
            raise CheckpointError(f"{where} has a {SCALE_SUFFIX} but is {info.dtype}, not F8_E4M3")
        return
    block = index.block
    if scale is None:
        raise CheckpointError(f"{where} is F8_E4M3 but {key}{SCALE_SUFFIX} is missing (one per {block} block)")
    if scale.dtype not in ("F32", "BF16", "F16"):
        raise CheckpointError(f"{where}{SCALE_SUFFIX} is {scale.dtype}; scales must be F32, BF16 or F16")
    if len(shape) != 2 or scale.shape != scale_shape(shape, block):
        raise CheckpointError(
            f"{where}{SCALE_SUFFIX} has shape {list(scale.shape)}, expected "
            f"{list(scale_shape(shape, block)) if len(shape) == 2 else 'none (fp8 needs a 2-D weight)'}"
        )


# safetensors maps a shard into memory: the pages a read touches stay resident (and count in RSS) while
# the shard is open, so a shard is reopened after this many bytes; memory stays bounded whatever its size.
REOPEN_BYTES = 1 << 30


def _stream(index: CheckpointIndex, keep_fp8: bool, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    by_file: dict[str, list[str]] = {}
    for ours, key in index.names.items():
        by_file.setdefault(index.tensors[key].file, []).append(ours)
    for file in sorted(by_file):
        names = by_file[file]
        while names:
            read = 0
            with _open(index.folder / file) as f:
                while names and read < REOPEN_BYTES:
                    ours = names.pop(0)
                    for item in _read(index, f, ours, index.names[ours], keep_fp8, dtype):
                        read += item[1].nbytes
                        yield item
    for ours, source in index.copies.items():
        key = index.names[source]
        with _open(index.folder / index.tensors[key].file) as f:
            yield from _read(index, f, ours, key, keep_fp8, dtype)


def _read(
    index: CheckpointIndex, f: Any, ours: str, key: str, keep_fp8: bool, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    tensor = f.get_tensor(key)
    if tensor.dtype == FP8_DTYPE:
        scale_file = index.tensors[key + SCALE_SUFFIX].file
        if scale_file == index.tensors[key].file:
            scale = f.get_tensor(key + SCALE_SUFFIX)
        else:
            with _open(index.folder / scale_file) as g:
                scale = g.get_tensor(key + SCALE_SUFFIX)
        if keep_fp8:
            yield ours, tensor
            yield ours + SCALE_SUFFIX, scale
            return
        tensor = dequantize_block_fp8(tensor, scale, index.block)
    if dtype is not None:
        tensor = tensor.float() if ours.endswith(BIAS_FP32) else tensor.to(dtype)
    yield ours, tensor
