"""The weight layout of an export folder: one file, one aligned slot per weight name, one writer, one reader.

Every graph of a folder (prefill, decode, MTP) refers to the same slots of `weights.bin` through ONNX
external data (location, offset, length), so a weight shared by graphs is stored once. A slot starts at
a multiple of ALIGN (4 KiB) and holds the tensor's raw little-endian bytes, nothing else; slots are laid
out in the order their names are first seen. FP8 weights (float8_e4m3fn) are stored as they are, one
byte per value, with their float32 scales in slots of their own.

    layout = plan_layout((name, dtype, shape) for ...)       # dtype: an onnx_ir DataType (or ONNX int)
    with WeightsWriter(tmp / WEIGHTS_FILE, layout) as w:      # tensor by tensor, in any order (pwrite)
        w.write(name, array)                                  # numpy / ml_dtypes array, or raw bytes
        w.write(stacked_name, expert_array, index=3)          # one expert of a stacked [E, ...] slot
    assert not w.missing()
    proto_initializer = layout.external_proto(name)           # onnx.TensorProto pointing at the slot
    ir_tensor = layout.external_tensor(name, base_dir)        # the same as an onnx_ir ExternalTensor

    location, slots = read_slots(folder, graph_protos)        # the reader: slots from the graphs' external data
    array = read_slot(folder / location, slot)                # one tensor's values (numpy, ml_dtypes dtypes)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 and float8 with numpy)
import numpy as np
import onnx
import onnx_ir as ir
from dsv3c.artifact.names import WEIGHTS_FILE
from dsv3c.errors import CheckpointError, UserError

ALIGN = 4096
__all__ = [
    "ALIGN",
    "WEIGHTS_FILE",
    "Layout",
    "Slot",
    "WeightsWriter",
    "check_location",
    "plan_layout",
    "read_slot",
    "read_slots",
]


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: ir.DataType
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.ceil(math.prod(self.shape) * self.dtype.bitwidth / 8)

    @property
    def elem_type(self) -> int:
        """The ONNX TensorProto element type (same numbers as ir.DataType)."""
        return int(self.dtype)

    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype.numpy())


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class Layout:
    """Slots by name; `total` is the weights file's size."""

    slots: dict[str, Slot] = field(default_factory=dict)
    total: int = 0

    def add(self, name: str, dtype: ir.DataType | int, shape: Sequence[int]) -> Slot:
        """The slot for `name`, placed after the last one unless known (then dtype and shape must agree)."""
        dtype, shape = ir.DataType(dtype), tuple(int(d) for d in shape)
        known = self.slots.get(name)
        if known is not None:
            if (known.dtype, known.shape) != (dtype, shape):
                raise RuntimeError(f"bug: weight {name} differs between graphs: {known} vs {dtype} {shape}")
            return known
        slot = Slot(name, dtype, shape, _aligned(self.total))
        self.slots[name] = slot
        self.total = slot.offset + slot.nbytes
        return slot

    def external_proto(self, name: str, location: str = WEIGHTS_FILE) -> onnx.TensorProto:
        """Slot `name` as an initializer with ONNX external data (relative location, offset, length)."""
        slot = self.slots[name]
        tensor = onnx.TensorProto(name=name, data_type=slot.elem_type, dims=slot.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", slot.offset), ("length", slot.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        return tensor

    def external_tensor(self, name: str, base_dir: str | Path, location: str = WEIGHTS_FILE) -> ir.ExternalTensor:
        """Slot `name` as an onnx_ir ExternalTensor of `base_dir/location` (read lazily, if ever)."""
        s = self.slots[name]
        return ir.ExternalTensor(
            location, s.offset, s.nbytes, s.dtype, shape=ir.Shape(s.shape), name=name, base_dir=str(base_dir)
        )


def plan_layout(entries: Iterable[tuple[str, ir.DataType | int, Sequence[int]]]) -> Layout:
    """Slots for (name, dtype, shape) entries in first-seen order; one name must mean one dtype and shape."""
    layout = Layout()
    for name, dtype, shape in entries:
        layout.add(name, dtype, shape)
    return layout


# ---- the writer ----------------------------------------------------------------------------------------


class WeightsWriter:
    """Writes tensors into their slots of a new weights file; `missing()` names slots not fully written.

    The file is created at its full size first (sparse), then each tensor is written at its offset as it
    comes, so memory holds one tensor at a time whatever the model's size. Write into a temporary folder
    (`atomic_folder`): the file is complete only once `missing()` is empty.
    """

    def __init__(self, path: Path, layout: Layout):
        self.layout = layout
        self.bytes_written = 0
        self._done: dict[str, set[int | None]] = {}
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, layout.total)

    def __enter__(self) -> WeightsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def write(self, name: str, data: np.ndarray | bytes | memoryview, index: int | None = None) -> None:
        """Write `data` to slot `name` (with `index`: part `index` of a slot stacked on its first axis).

        `data`: an array of the slot's dtype and shape (float8_e4m3fn and bfloat16 as ml_dtypes arrays, or
        their raw bytes as uint8 of the same shape), or exactly the part's raw bytes.
        """
        slot = self.layout.slots[name]
        shape = slot.shape if index is None else slot.shape[1:]
        if index is not None and not (slot.shape and 0 <= index < slot.shape[0]):
            raise CheckpointError(f"{name}: part {index} is outside the stacked slot of shape {list(slot.shape)}")
        part = math.ceil(math.prod(shape) * slot.dtype.bitwidth / 8)
        if isinstance(data, np.ndarray):
            if tuple(data.shape) != shape:
                raise CheckpointError(f"tensor for {name} has shape {list(data.shape)}, expected {list(shape)}")
            if data.dtype != slot.numpy_dtype() and data.dtype != np.uint8:
                raise ValueError(f"bug: {name} is {data.dtype}, its slot {slot.dtype}")
            raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1).data
        else:
            raw = memoryview(data).cast("B")
        if len(raw) != part:
            raise CheckpointError(f"tensor for {name} has {len(raw)} bytes, its slot {part}")
        offset = slot.offset + (0 if index is None else index * part)
        while raw:
            written = os.pwrite(self._fd, raw, offset)
            raw, offset = raw[written:], offset + written
        self.bytes_written += part
        self._done.setdefault(name, set()).add(index)

    def missing(self) -> list[str]:
        """Slots not fully written: neither as a whole nor part by part."""
        out = []
        for name, slot in self.layout.slots.items():
            parts = self._done.get(name, set())
            if None not in parts and not (slot.shape and parts >= set(range(slot.shape[0]))):
                out.append(name)
        return out


# ---- the reader ----------------------------------------------------------------------------------------


def check_location(folder: Path, location: str | os.PathLike[str], what: Path | str) -> Path:
    """`folder/location` for an external-data location (or a manifest's file name) that stays inside `folder`.

    UserError for an absolute path, a `..`, a drive letter, or a link that resolves outside `folder`.
    """
    location = os.fspath(location)
    if not location:
        raise UserError(f"{what}: an initializer declares external data without a location; re-export the model")
    parts = Path(location.replace("\\", "/")).parts
    if (
        os.path.isabs(location)
        or location.startswith(("/", "\\"))
        or ".." in parts
        or (len(location) > 1 and location[1] == ":")
    ):
        raise UserError(
            f"{what}: external data location {location!r} escapes the model's folder; "
            "locations must be relative paths inside it (re-export, or move the data beside the model)"
        )
    target = folder / location
    try:
        outside = target.exists() and not target.resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte: no such file can exist
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(
            f"{what}: external data location {location[:80]!r}{'...' if len(location) > 80 else ''} is not a "
            f"usable file name ({reason}); re-export the model"
        ) from None
    if outside:
        raise UserError(f"{what}: external data {location!r} links outside the model's folder ({target.resolve()})")
    return target


def external_entries(t: onnx.TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length or None) of an external initializer; UserError when they are not numbers."""
    info = {e.key: e.value for e in t.external_data}
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise UserError(f"initializer {t.name!r} has an invalid external data offset/length") from None
    if offset < 0 or (length is not None and length < 0):
        raise UserError(f"initializer {t.name!r} has an invalid external data offset/length")
    return info.get("location", ""), offset, length


def read_slots(folder: Path, graphs: Iterable[onnx.ModelProto]) -> tuple[str, list[Slot]]:
    """(weights file name, every external initializer of the graphs once, by offset) from their external data.

    The graphs are protos loaded without their data (`onnx.load(path, load_external_data=False)`). UserError
    when the weights are not in one file inside `folder`, or a slot's length disagrees with its dtype and shape.
    """
    slots: dict[str, Slot] = {}
    files = set()
    for model in graphs:
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            location, offset, length = external_entries(t)
            check_location(folder, location, folder)
            try:
                slot = Slot(t.name, ir.DataType(t.data_type), tuple(int(d) for d in t.dims), offset)
            except ValueError:
                raise UserError(f"{folder}: weight {t.name} has the unknown ONNX type {t.data_type}") from None
            if length is not None and length != slot.nbytes:
                raise UserError(f"{folder}: weight {t.name} has {length} bytes for a slot of {slot.nbytes}; re-export")
            slots[t.name] = slot
            files.add(location)
    if len(files) != 1:
        raise UserError(f"{folder}: expected the weights in one data file, found {sorted(files) or 'none'}")
    return files.pop(), sorted(slots.values(), key=lambda s: s.offset)


def read_slot(path: Path, slot: Slot) -> np.ndarray:
    """Slot `slot` of the weights file `path` as an array of its dtype and shape (read, not mapped)."""
    return np.concatenate(list(iter_slot(path, slot))).reshape(slot.shape) if slot.shape else _scalar(path, slot)


def _scalar(path: Path, slot: Slot) -> np.ndarray:
    return next(iter_slot(path, slot)).reshape(())


def iter_slot(path: Path, slot: Slot, chunk: int = 1 << 22) -> Iterator[np.ndarray]:
    """Slot `slot`'s flat values in pieces of at most `chunk` elements, streamed from `path`."""
    if slot.dtype.bitwidth < 8:
        raise ValueError(f"{slot.name}: {slot.dtype} packs values below a byte; read its raw bytes instead")
    dtype = slot.numpy_dtype()
    numel = math.prod(slot.shape)
    with open(path, "rb") as f:
        f.seek(slot.offset)
        for start in range(0, max(numel, 1), chunk):
            count = min(chunk, numel - start)
            raw = f.read(count * dtype.itemsize)
            if len(raw) != count * dtype.itemsize:
                raise UserError(f"{path}: truncated; weight {slot.name} ends past the end of the file")
            yield np.frombuffer(raw, dtype=dtype)  # ONNX stores little-endian, as every host dsv3c runs on
