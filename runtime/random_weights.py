"""Fill a `--weights none` export folder with random weights, in place.

A model too large to carry (V2-Lite: 31 GB in bf16) is exported here as topology only and filled on the
machine that runs it. The graphs already name every weight's file, offset and length (ONNX external data);
this writes those byte ranges: ones for RMSNorm weights, N(0, std) for everything else, each tensor from
its own generator seeded by (seed, name), so the same folder and seed give the same bytes in any order.
The manifest then says `"weights": "random"` and records a `fill_random` stage.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from dsv3c.artifact.manifest import read_manifest, write_manifest
from dsv3c.errors import UserError

DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
}


@dataclass(frozen=True)
class Region:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    length: int


def external_regions(folder: Path, graphs: list[str]) -> tuple[str, list[Region]]:
    """(data file name, every external initializer of the graphs once), from the graphs' external data."""
    regions: dict[str, Region] = {}
    files = set()
    for graph in graphs:
        model = onnx.load(str(folder / graph), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            if t.data_type not in DTYPES:
                raise UserError(f"{graph}: weight {t.name} has ONNX type {t.data_type}, which this filler cannot write")
            dtype = DTYPES[t.data_type]
            length = int(info.get("length", math.prod(t.dims) * dtype.itemsize))
            regions[t.name] = Region(t.name, dtype, tuple(t.dims), int(info.get("offset", 0)), length)
            files.add(info["location"])
    if len(files) != 1:
        raise UserError(f"{folder}: expected the weights in one data file, found {sorted(files) or 'none'}")
    return files.pop(), sorted(regions.values(), key=lambda r: r.offset)


def random_tensor(region: Region, seed: int, std: float, device: torch.device) -> torch.Tensor:
    if region.name.endswith("norm.weight"):
        return torch.ones(region.shape, dtype=region.dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(
        (seed * 0x9E3779B1 + zlib.crc32(region.name.encode())) % 2**63
    )
    values = torch.empty(region.shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=generator)
    return values.to(region.dtype)


def fill_random(folder: Path, seed: int = 0, std: float = 0.02, device: str = "cpu") -> int:
    """Write random weights into `folder` (a --weights none export); returns the bytes written."""
    manifest = read_manifest(folder)
    if manifest.weights != "none":
        raise UserError(f"{folder}: already has weights ({manifest.weights}); fill only a --weights none export")
    graphs = [g for g in manifest.graphs.values() if g is not None]
    data_file, regions = external_regions(folder, graphs)
    total = max((r.offset + r.length for r in regions), default=0)
    target = torch.device(device)
    fd = os.open(folder / data_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total)
        for region in regions:
            tensor = random_tensor(region, seed, std, target).cpu().contiguous()
            view = tensor.view(torch.uint8).numpy().data.cast("B")
            if len(view) != region.length:
                raise UserError(f"{region.name}: {len(view)} bytes for a region of {region.length}; re-export")
            offset = region.offset
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
    finally:
        os.close(fd)
    stage = {"stage": "fill_random", "seed": seed, "std": std, "tensors": len(regions), "bytes": total}
    filled = dataclasses.replace(manifest, weights="random", weights_file=data_file).with_stage(stage)
    write_manifest(filled, folder)
    return total
