"""One weights file for every graph of an export folder, written tensor by tensor.

The layout gives each initializer name one aligned slot in `weights.bin`; prefill, decode and MTP refer
to the same slots through ONNX external data (location, offset, length), so shared weights are stored
once. Writers fill slots in any order with `pwrite`, so a checkpoint streams shard by shard with memory
bounded by one tensor; a routed expert of a checkpoint lands at its index inside the stacked slot.

Sources yield (model state_dict name, tensor): `init_random`'s weights regenerated one tensor at a time,
or a checkpoint through `load_state_dict_streaming`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from dsv3c.errors import CheckpointError
from dsv3c.models.config import DeepseekV3Config

WEIGHTS_FILE = "weights.bin"
ALIGN = 4096
_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.FLOAT16: torch.float16,
}
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class Slot:
    name: str
    elem_type: int  # onnx.TensorProto.FLOAT, BFLOAT16, ...
    shape: tuple[int, ...]
    offset: int

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.elem_type]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Layout:
    slots: dict[str, Slot] = field(default_factory=dict)
    total: int = 0

    def external(self, name: str) -> onnx.TensorProto:
        """Slot `name` as an initializer with ONNX external data (relative location, offset, length)."""
        slot = self.slots[name]
        tensor = onnx.TensorProto(name=name, data_type=slot.elem_type, dims=slot.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", WEIGHTS_FILE), ("offset", slot.offset), ("length", slot.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        return tensor


def plan_layout(values: Iterable[onnx.ValueInfoProto]) -> Layout:
    """Slots for the weights of all graphs, in first-seen order; one name must mean one dtype and shape."""
    layout = Layout()
    for value in values:
        t = value.type.tensor_type
        elem_type, shape = t.elem_type, tuple(int(d.dim_value) for d in t.shape.dim)
        known = layout.slots.get(value.name)
        if known is not None:
            if (known.elem_type, known.shape) != (elem_type, shape):
                raise RuntimeError(f"bug: weight {value.name} differs between graphs")
            continue
        offset = -(-layout.total // ALIGN) * ALIGN
        layout.slots[value.name] = Slot(value.name, elem_type, shape, offset)
        layout.total = offset + layout.slots[value.name].nbytes
    return layout


def slot_of(name: str) -> tuple[str, int | None]:
    """A model state_dict name -> (slot name, expert index within a stacked slot, or None)."""
    m = _EXPERT.match(name)
    return (f"{m[1]}.{m[3]}.weight", int(m[2])) if m else (name, None)


class WeightWriter:
    """Writes tensors into their slots of `weights.bin`; `missing()` names slots not fully written."""

    def __init__(self, path: Path, layout: Layout):
        self.layout = layout
        self._done: dict[str, set[int | None]] = {}
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, layout.total)

    def __enter__(self) -> WeightWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a model tensor (state_dict name) to its slot; names the graphs do not use are skipped."""
        slot_name, index = slot_of(name)
        slot = self.layout.slots.get(slot_name)
        if slot is not None:
            self._write(slot, index, tensor)

    def _write(self, slot: Slot, index: int | None, tensor: torch.Tensor) -> None:
        shape = slot.shape if index is None else slot.shape[1:]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"tensor for {slot.name} has shape {list(tensor.shape)}, expected {list(shape)}")
        data = tensor.detach().to(slot.dtype).contiguous().view(torch.uint8).numpy()  # raw bytes
        offset = slot.offset + (0 if index is None else index * data.nbytes)
        view = data.data.cast("B")
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written
        self._done.setdefault(slot.name, set()).add(index)

    def missing(self) -> list[str]:
        """Slots not fully written: neither as a whole nor expert by expert."""
        out = []
        for name, slot in self.layout.slots.items():
            parts = self._done.get(name, set())
            if None not in parts and not (slot.shape and parts >= set(range(slot.shape[0]))):
                out.append(name)
        return out


# ---- sources -----------------------------------------------------------------------------------------


def checkpoint_source(path: Path, config: DeepseekV3Config) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint folder, shard by shard; fp8 weights are dequantized (float32) one tensor at a time."""
    from dsv3c.models.checkpoint import load_state_dict_streaming

    yield from load_state_dict_streaming(path, config)
