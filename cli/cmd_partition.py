"""dsv3c partition: split a checkpoint into one folder per expert-parallel rank.

dsv3c partition CKPT --ep 8 --out PART        # PART/rank-{0..7}/ + PART/partition.json
torchrun --nproc-per-node 8 -m dsv3c generate PART --ep 8 --device cuda --prompt-ids 1,2,3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "split a checkpoint into per-rank folders for expert parallelism (routed experts spread over --ep ranks)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--ep", type=int, required=True, metavar="N", help="expert-parallel ranks (processes, GPUs)")
    p.add_argument("--out", type=Path, required=True, help="output folder (rank-{r}/ per rank, partition.json)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder dsv3c wrote")
    p.add_argument("--json", action="store_true", help="print the partition manifest as JSON")


def run(args: argparse.Namespace) -> int:
    from dsv3c.parallel.partition import partition_checkpoint

    manifest = partition_checkpoint(args.model, args.ep, args.out, args.force)
    if args.json:
        print(json.dumps(manifest))
        return 0
    for r in manifest["ranks"]:
        experts = r["experts"]
        print(f"rank {r['rank']}: experts {experts[0]}-{experts[-1]}, {r['bytes'] / 2**20:.1f} MiB in {r['folder']}/")
    return 0
