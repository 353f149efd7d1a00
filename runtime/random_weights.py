"""Fill a `--weights none` export folder with random weights, in place.

A model too large to carry (V2-Lite: 31 GB in bf16) is exported here as topology only and filled on the
machine that runs it. The graphs already name every weight's slot (ONNX external data: file, offset,
length; `dsv3c.artifact.weights` reads them); this writes those slots: ones for RMSNorm weights,
uniform bytes for 8-bit weights (their scales set so that they dequantize with std `std`), N(0, std) for
everything else, each tensor from its own generator seeded by (seed, name), so the same
folder and seed give the same bytes in any order. The weights file is written beside the old one and
renamed over it, then the manifest says `"weights": "random"` and records a `fill_random` stage.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from dsv3c.artifact.atomic import atomic_file
from dsv3c.artifact.manifest import read_manifest, write_manifest
from dsv3c.artifact.names import Q8_SCALES_SUFFIX
from dsv3c.artifact.weights import Layout, Slot, WeightsWriter, read_slots
from dsv3c.errors import UserError

DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.FLOAT8E4M3FN: torch.float8_e4m3fn,
    ir.DataType.UINT8: torch.uint8,  # `lower --target ort --weights-8bit`: MatMulNBits / QMoE weights
}


def random_tensor(slot: Slot, seed: int, std: float, device: torch.device) -> torch.Tensor:
    dtype = DTYPES[slot.dtype]
    if slot.name.endswith("norm.weight"):
        return torch.ones(slot.shape, dtype=dtype, device=device)
    if slot.name.endswith(Q8_SCALES_SUFFIX):
        # 8-bit weights are uniform bytes around the zero point 128: std(q - 128) = 128 / sqrt(3), so this
        # scale gives the dequantized weights the float ones' std
        return torch.full(slot.shape, std * 3**0.5 / 128, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed((seed * 0x9E3779B1 + zlib.crc32(slot.name.encode())) % 2**63)
    if dtype == torch.uint8:
        return torch.randint(0, 256, slot.shape, dtype=torch.uint8, device=device, generator=generator)
    values = torch.empty(slot.shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=generator)
    return values.to(dtype)


def fill_random(folder: Path, seed: int = 0, std: float = 0.02, device: str = "cpu") -> int:
    """Write random weights into `folder` (a --weights none export); returns the bytes written."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.weights != "none":
        raise UserError(f"{folder}: already has weights ({manifest.weights}); fill only a --weights none export")
    graphs = [onnx.load(str(folder / g), load_external_data=False) for g in manifest.graphs.values() if g is not None]
    data_file, slots = read_slots(folder, graphs)
    for slot in slots:
        if slot.dtype not in DTYPES:
            raise UserError(f"{folder}: weight {slot.name} is {slot.dtype.name}, which this filler cannot write")
    layout = Layout({s.name: s for s in slots}, max((s.offset + s.nbytes for s in slots), default=0))
    target = torch.device(device)
    with atomic_file(folder / data_file) as tmp, WeightsWriter(tmp, layout) as writer:
        for slot in slots:
            tensor = random_tensor(slot, seed, std, target).cpu().contiguous()
            writer.write(slot.name, tensor.view(torch.uint8).numpy().tobytes())
    stage = {"stage": "fill_random", "seed": seed, "std": std, "tensors": len(slots), "bytes": layout.total}
    filled = dataclasses.replace(manifest, weights="random", weights_file=data_file).with_stage(stage)
    write_manifest(filled, folder)
    return layout.total
