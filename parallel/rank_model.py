"""Load one rank's model: the replicated weights and this rank's routed experts, nothing else.

The source is either a checkpoint folder (the rank reads only the tensors it needs from the shards) or a
partition folder from `dsv3c partition` (the rank reads only its own `rank-{r}/`). Experts held by other
ranks become `RemoteExpert` placeholders without weights; the dispatcher never calls them.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from dsv3c.artifact.json_file import read_json_object
from dsv3c.errors import CheckpointError, UserError
from dsv3c.models.checkpoint import CheckpointIndex, StoredTensor, load_state_dict_streaming, read_index
from dsv3c.models.checkpoint_layout import (
    BIAS_FP32,
    CONFIG_FILE,
    INDEX_FILE,
    SCALE_SUFFIX,
    assign_parameter,
    copy_source,
    finish_model,
    module_name,
    parameter_shapes,
)
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM, MoE
from dsv3c.parallel.partition import RANK_FILE, is_partition, read_partition, refuse_export_folder
from dsv3c.parallel.plan import ExpertPlan
from safetensors import SafetensorError, safe_open
from torch import nn


class RemoteExpert(nn.Module):
    """A routed expert that another rank holds: no weights here."""

    def __init__(self, expert: int, owner: int):
        super().__init__()
        self.expert, self.owner = expert, owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"bug: expert {self.expert} lives on rank {self.owner}; its tokens must be sent there")


def source_plan(source: Path, ranks: int) -> ExpertPlan:
    """The plan for `ranks` ranks over `source`, checked against a partition's own plan (no collective)."""
    refuse_export_folder(source)
    if is_partition(source):
        part = read_partition(source)
        if part.ranks != ranks:
            raise UserError(
                f"{source} was partitioned for --ep {part.ranks}, but {ranks} ranks were started; run "
                f"torchrun --nproc-per-node {part.ranks} ... --ep {part.ranks}, or partition again with --ep {ranks}"
            )
        return part.plan
    config = DeepseekV3Config.from_json(_config_path(source))
    return ExpertPlan.for_config(config, ranks)


def _meta_rank_model(config: DeepseekV3Config, plan: ExpertPlan, rank: int) -> DeepseekV3ForCausalLM:
    """The model on the meta device with the experts other ranks own replaced by placeholders."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    owners = plan.owners()
    for module in model.modules():
        if isinstance(module, MoE):
            for e, owner in enumerate(owners):
                if owner != rank:
                    module.experts[e] = RemoteExpert(e, owner)
    return model


def load_rank_model(
    source: Path, plan: ExpertPlan, rank: int, dtype: torch.dtype = torch.float32
) -> DeepseekV3ForCausalLM:
    """This rank's model on the CPU: replicated weights, its own experts, placeholders for the rest."""
    index = _rank_folder_index(source, plan, rank) if is_partition(source) else _checkpoint_index(source, plan, rank)
    model = _meta_rank_model(index.config, plan, rank)
    for name, tensor in load_state_dict_streaming(index, dtype=dtype):
        assign_parameter(model, name, tensor)
    return finish_model(model)


def _config_path(source: Path) -> Path:
    path = Path(source) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{source}: neither a checkpoint folder (config.json) nor a partition folder (partition.json)")
    return path


def _checkpoint_index(source: Path, plan: ExpertPlan, rank: int) -> CheckpointIndex:
    index = read_index(source)  # checks every header; the rank then reads only what it holds
    index.names = {ours: key for ours, key in index.names.items() if plan.holds(rank, ours)}
    return index


def _rank_folder_index(source: Path, plan: ExpertPlan, rank: int) -> CheckpointIndex:
    """The index of `rank-{r}/`: its shards' headers, checked against what this rank needs."""
    folder = read_partition(source).folder(rank)
    _check_rank_file(folder, rank, plan.ranks)
    config = DeepseekV3Config.from_json(_config_path(folder))
    weight_map = read_json_object(folder / INDEX_FILE, "partition again").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{folder / INDEX_FILE}: not a safetensors index (no 'weight_map' of names); partition again"
        )
    for file in set(weight_map.values()):  # a shard is a file of the rank folder, never a path out of it
        if Path(file).name != file or not file.isprintable() or not file.endswith(".safetensors"):
            raise CheckpointError(
                f"{folder / INDEX_FILE}: shard {file[:80]!r} is not a .safetensors file name of the rank folder; "
                "partition again"
            )
    tensors: dict[str, StoredTensor] = {}
    for file in sorted(set(weight_map.values())):
        try:
            with safe_open(folder / file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    s = f.get_slice(key)
                    tensors[key] = StoredTensor(file, s.get_dtype(), tuple(s.get_shape()))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{folder / file}: unreadable safetensors ({e}); partition again") from None
    index = CheckpointIndex(folder, config, tensors)
    expected = {n: s for n, s in parameter_shapes(config).items() if plan.holds(rank, n)}
    for key, info in tensors.items():
        if key.endswith(SCALE_SUFFIX) and key.removesuffix(SCALE_SUFFIX) in tensors:
            continue
        ours = module_name(key, config)
        if ours is None or ours not in expected:
            raise CheckpointError(f"{folder / info.file}: tensor {key} does not belong on rank {rank}; partition again")
        if info.shape != expected[ours]:
            raise CheckpointError(
                f"{folder / info.file}: {key} has shape {list(info.shape)}, expected {expected[ours]}"
            )
        index.names[ours] = key
    for name in expected:
        source_name = copy_source(name, config)
        if name not in index.names and source_name is not None and source_name in index.names:
            index.copies[name] = source_name
    missing = [n for n in expected if n not in index.names and n not in index.copies]
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensors of rank {rank} are missing (e.g. {missing[0]})")
    return index


def _check_rank_file(folder: Path, rank: int, ranks: int) -> None:
    raw = read_json_object(folder / RANK_FILE, "partition again")
    held = (raw.get("rank"), raw.get("ranks"))
    if held != (rank, ranks) or not all(type(n) is int for n in held):  # JSON's true is not rank 1
        shown = " of ".join(repr(n)[:20] for n in held)
        raise CheckpointError(f"{folder}: holds rank {shown}, but rank {rank} of {ranks} opened it; partition again")


def random_rank_model(
    config: DeepseekV3Config,
    plan: ExpertPlan,
    rank: int,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> DeepseekV3ForCausalLM:
    """This rank's share of a random model, made on `device` (benchmarks of models too large to carry).

    Each tensor comes from its own generator seeded by (seed, name): every rank makes the same replicated
    weights, and any --ep the same model. Norms are ones, the router bias zeros, the rest N(0, 0.02).
    """
    model = _meta_rank_model(config, plan, rank)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(BIAS_FP32):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                p.normal_(0.0, 0.02, generator=g)
    model = finish_model(model.to(dtype))
    for name, p in model.named_parameters():
        if name.endswith(BIAS_FP32):
            p.data = p.data.float()  # selection bias stays float32, as loaded checkpoints keep it
    return model.to(device)
