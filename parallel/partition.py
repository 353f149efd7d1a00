"""Split a checkpoint folder into one folder per expert-parallel rank, shard by shard.

    OUT/partition.json        the plan: experts per rank, the collectives that join them, format_version
    OUT/rank-{r}/config.json  the full model's config (routing needs every expert's router row)
    OUT/rank-{r}/model-*.safetensors + model.safetensors.index.json
                              the replicated tensors plus rank r's routed experts, stored as in the
                              source (fp8 weights keep their weight_scale_inv)
    OUT/rank-{r}/rank.json    which rank of how many this folder is, and its experts

The source's shards are read one at a time, tensor by tensor (safetensors `safe_open`); each tensor goes
to the ranks that need it, and a shard's share for each rank is written before the next shard is opened,
so memory holds at most one source shard. The output appears whole or not at all (written into a
temporary sibling, renamed at the end).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dsv3c import __version__, progress
from dsv3c.artifact.atomic import atomic_folder, write_checkpoint_marker
from dsv3c.errors import UserError
from dsv3c.models.checkpoint import CheckpointIndex, read_index
from dsv3c.models.checkpoint_layout import CONFIG_FILE, INDEX_FILE, SCALE_SUFFIX
from dsv3c.parallel.plan import COLLECTIVES, ExpertPlan
from safetensors import safe_open
from safetensors.torch import save_file

PARTITION_FILE = "partition.json"
RANK_FILE = "rank.json"
FORMAT = "dsv3c-expert-parallel-partition"
FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)
# small files every rank (and the generate command at the root) may read
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
REPLICATED = "attention, dense MLPs, shared experts, routers, norms, embeddings, LM head, MTP (all but routed experts)"


def rank_folder(root: Path, rank: int) -> Path:
    return root / f"rank-{rank}"


@dataclass(frozen=True)
class Partition:
    """A partition folder as read back: its plan and where each rank's folder is."""

    root: Path
    plan: ExpertPlan
    source: str

    @property
    def ranks(self) -> int:
        return self.plan.ranks

    def folder(self, rank: int) -> Path:
        return rank_folder(self.root, rank)


def is_partition(folder: Path) -> bool:
    return (Path(folder) / PARTITION_FILE).is_file()


def read_partition(folder: Path) -> Partition:
    path = Path(folder) / PARTITION_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path}: not a readable partition manifest ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UserError(f"{path}: not a dsv3c partition manifest (format {FORMAT!r})")
    if raw.get("format_version") not in READABLE_VERSIONS:
        raise UserError(
            f"{path}: format_version {raw.get('format_version')!r}; this dsv3c reads {list(READABLE_VERSIONS)}"
        )
    plan = ExpertPlan.from_dict(raw.get("plan"), str(path))
    return Partition(Path(folder), plan, str(raw.get("source", "")))


def refuse_export_folder(source: Path) -> None:
    """Expert parallelism runs on PyTorch from checkpoint weights; say why an export folder is refused."""
    if (Path(source) / "manifest.json").is_file():
        raise UserError(
            f"{source} is an export folder; use the checkpoint folder it came from. Per-rank ONNX graphs would "
            "need an all-to-all inside the graph, and onnxruntime's PyPI wheels have no collective op "
            "(com.microsoft AllToAll exists only in builds with NCCL), so expert parallelism runs on PyTorch"
        )


def partition_checkpoint(source: Path, ranks: int, out: Path, force: bool = False) -> dict[str, Any]:
    """Write the partition of checkpoint folder `source` for `ranks` ranks into `out`; returns the manifest."""
    refuse_export_folder(source)
    index = read_index(source)  # every shard header checked before anything is written
    plan = ExpertPlan.for_config(index.config, ranks)
    by_file = _stored_by_file(index)
    total = sum(_bytes(index, k) for keys in by_file.values() for k in keys)
    with atomic_folder(out, force, inputs=[source]) as tmp:
        folders = [rank_folder(tmp, r) for r in range(ranks)]
        for r, folder in enumerate(folders):
            folder.mkdir()
            index.config.save(folder / CONFIG_FILE)
            _copy_side_files(Path(source), folder)
            _write_json(folder / RANK_FILE, {"rank": r, "ranks": ranks, "experts": list(plan.experts[r])})
        _copy_side_files(Path(source), tmp)
        shard_maps: list[dict[str, str]] = [{} for _ in range(ranks)]
        sizes = [0] * ranks
        with progress.task("partitioning", total=total, unit="bytes") as task:
            for i, file in enumerate(sorted(by_file)):
                name = f"model-{i + 1:05d}-of-{len(by_file):05d}.safetensors"
                shares: list[dict[str, torch.Tensor]] = [{} for _ in range(ranks)]
                with safe_open(index.folder / file, framework="pt") as f:
                    for key in by_file[file]:
                        tensor = f.get_tensor(key)
                        for r in range(ranks):
                            if plan.holds(r, key):
                                shares[r][key] = tensor
                        task.advance(tensor.numel() * tensor.element_size())
                for r, share in enumerate(shares):
                    if share:
                        save_file(share, str(folders[r] / name), metadata={"format": "pt"})
                        os.chmod(folders[r] / name, 0o644)  # safetensors writes 0600; weights are shared read-only
                        shard_maps[r].update(dict.fromkeys(share, name))
                        sizes[r] += sum(t.numel() * t.element_size() for t in share.values())
                del shares
        for r, folder in enumerate(folders):
            _write_json(folder / INDEX_FILE, {"metadata": {"total_size": sizes[r]}, "weight_map": shard_maps[r]})
        manifest = _manifest(source, plan, shard_maps, sizes)
        _write_json(tmp / PARTITION_FILE, manifest)
        write_checkpoint_marker(tmp, "expert-parallel partition")
    return manifest


def _stored_by_file(index: CheckpointIndex) -> dict[str, list[str]]:
    """Every stored tensor the model reads (fp8 scales with their weights), grouped by source shard."""
    keys = set(index.names.values())
    keys |= {k + SCALE_SUFFIX for k in list(keys) if k + SCALE_SUFFIX in index.tensors}
    by_file: dict[str, list[str]] = {}
    for key in sorted(keys):
        by_file.setdefault(index.tensors[key].file, []).append(key)
    return by_file


def _bytes(index: CheckpointIndex, key: str) -> int:
    info = index.tensors[key]
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1}.get(info.dtype, 4)
    return itemsize * int(torch.Size(info.shape).numel())


def _manifest(source: Path, plan: ExpertPlan, maps: list[dict[str, str]], sizes: list[int]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dsv3c_version": __version__,
        "written_by": "dsv3c",
        "source": str(Path(source).resolve()),
        "source_kind": "checkpoint",
        "ep": plan.ranks,
        "placement": "contiguous blocks of routed experts, the same in every MoE layer (MTP's included)",
        "plan": plan.to_dict(),
        "replicated": REPLICATED,
        "collectives": COLLECTIVES,
        "ranks": [
            {
                "rank": r,
                "folder": f"rank-{r}",
                "experts": list(plan.experts[r]),
                "tensors": len(maps[r]),
                "bytes": sizes[r],
                "files": sorted(set(maps[r].values())),
            }
            for r in range(plan.ranks)
        ],
    }


def _copy_side_files(source: Path, folder: Path) -> None:
    for name in _SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
