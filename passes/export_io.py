"""Read an export folder into ir.Models and write a transformed one: one weights file for every graph.

    graphs = read_export(folder)          # manifest + {role: ir.Model}, weights left on disk (lazy)
    ... run passes on graphs.models ...
    write_export(graphs, out, stage)      # OUT/{role}.onnx + OUT/weights.bin + manifest with `stage` appended

Weights are the initializers that live in the weights file: those read as external data, and those a
pass marks with `mark_weight` (fp8 weights, their scales). Everything else stays inline in the graph
file. A weight name means one tensor in every graph (prefill, decode and MTP share slots), so the writer
stores each name once, one tensor at a time (pass-made tensors are `ir.LazyTensor`s computed on write).

A folder exported with `--weights none` declares its weights without data: its graphs are transformed
structurally (new weights declared with their dtype and shape) and written without a weights file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir
from dsv3c.artifact.manifest import Manifest, Signature, TensorInfo, read_manifest, write_manifest
from dsv3c.errors import UserError
from dsv3c.passes.builder import static_dims
from dsv3c.runtime.atomic import atomic_folder

WEIGHTS_FILE = "weights.bin"
ALIGN = 4096
OUR_DOMAIN = "dsv3c"
_WEIGHT_KEY = "dsv3c.weight"


@dataclass
class ExportGraphs:
    """An export folder in memory: its manifest and one ir.Model per graph role."""

    manifest: Manifest
    models: dict[str, ir.Model]

    @property
    def folder(self) -> Path:
        assert self.manifest.folder is not None
        return self.manifest.folder

    @property
    def has_weights(self) -> bool:
        return self.manifest.weights != "none"

    def stage_names(self) -> list[str]:
        return [str(s.get("stage")) for s in self.manifest.stages]


def mark_weight(value: ir.Value) -> ir.Value:
    """Store this initializer in the weights file (a pass-made weight or scale)."""
    value.meta[_WEIGHT_KEY] = True
    return value


def is_weight(value: ir.Value) -> bool:
    return bool(value.meta.get(_WEIGHT_KEY)) or isinstance(value.const_value, ir.ExternalTensor)


def read_export(folder: str | Path) -> ExportGraphs:
    """Every graph the manifest lists, as ir.Models; UserError for a folder dsv3c did not write."""
    manifest = read_manifest(folder)
    if not manifest.stages or manifest.stages[0].get("stage") != "export":
        raise UserError(f"{folder}: the manifest's first stage is not 'export'; is this a folder dsv3c wrote?")
    models = {}
    for role, file in manifest.graphs.items():
        if file is None:
            continue
        path = manifest.graph_path(role)
        try:
            model = ir.load(path)
        except Exception as e:  # protobuf and onnx raise several types; report one line
            raise UserError(f"{path}: not a readable ONNX file ({type(e).__name__}: {str(e)[:200]})") from None
        if OUR_DOMAIN not in model.opset_imports and model.producer_name != "dsv3c":
            raise UserError(f"{path}: not a dsv3c graph (no '{OUR_DOMAIN}' opset, producer {model.producer_name!r})")
        for value in model.graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                mark_weight(value)
        models[role] = model
    return ExportGraphs(manifest, models)


# ---- writing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    name: str
    dtype: ir.DataType
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _weights(graphs: ExportGraphs) -> Iterator[ir.Value]:
    for model in graphs.models.values():
        for value in model.graph.initializers.values():
            if is_weight(value):
                yield value


def plan_slots(graphs: ExportGraphs) -> dict[str, _Slot]:
    """One aligned slot per weight name, in first-seen order; a name must mean one dtype and shape."""
    slots: dict[str, _Slot] = {}
    end = 0
    for value in _weights(graphs):
        tensor = value.const_value
        assert value.name is not None and tensor is not None
        shape = static_dims(tensor.shape)
        known = slots.get(value.name)
        if known is not None:
            if (known.dtype, known.shape) != (tensor.dtype, shape):
                raise RuntimeError(
                    f"bug: weight {value.name} differs between graphs: {known} vs {tensor.dtype} {shape}"
                )
            continue
        offset = -(-end // ALIGN) * ALIGN
        nbytes = math.ceil(math.prod(shape) * tensor.dtype.bitwidth / 8)
        slots[value.name] = _Slot(value.name, tensor.dtype, shape, offset, nbytes)
        end = offset + nbytes
    return slots


def _write_weights(path: Path, graphs: ExportGraphs, slots: dict[str, _Slot]) -> None:
    done: set[str] = set()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, max((s.offset + s.nbytes for s in slots.values()), default=0))
        for value in _weights(graphs):
            assert value.name is not None and value.const_value is not None
            if value.name in done:
                continue
            slot = slots[value.name]
            data = value.const_value.tobytes()  # one tensor in memory at a time
            if len(data) != slot.nbytes:
                raise RuntimeError(f"bug: {value.name} has {len(data)} bytes, its slot {slot.nbytes}")
            view, offset = memoryview(data), slot.offset
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
            done.add(value.name)
    finally:
        os.close(fd)


def _bind(graphs: ExportGraphs, slots: dict[str, _Slot], folder: Path) -> None:
    """Point every weight at its slot of `folder/weights.bin` (which may not exist: weightless folders)."""
    for value in _weights(graphs):
        assert value.name is not None
        s = slots[value.name]
        value.const_value = ir.ExternalTensor(
            WEIGHTS_FILE, s.offset, s.nbytes, s.dtype, shape=ir.Shape(s.shape), name=s.name, base_dir=str(folder)
        )


def signature(model: ir.Model) -> Signature:
    def info(v: ir.Value) -> TensorInfo:
        assert v.name is not None and v.dtype is not None
        dims: list[int | str] = [] if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape.dims]
        dtype = "bfloat16" if v.dtype == ir.DataType.BFLOAT16 else str(v.dtype.numpy())
        return TensorInfo(v.name, dtype, dims)

    return Signature([info(v) for v in model.graph.inputs], [info(v) for v in model.graph.outputs])


def write_export(
    graphs: ExportGraphs,
    out: Path,
    stage: dict[str, Any],
    *,
    force: bool = False,
    finish: Callable[[Path], dict[str, Any]] | None = None,
) -> Manifest:
    """Write `graphs` as the export folder `out` (atomically) with `stage` appended to the manifest.

    `finish(folder)`, when given, runs on the written (temporary) folder before the manifest and returns
    entries to add to the stage (e.g. files it wrote). Afterwards the models' weights refer to
    `out/weights.bin`; the returned manifest has its folder set.
    """
    out = Path(out)
    if out.resolve() == graphs.folder.resolve():
        raise UserError(f"{out}: the output folder must differ from the input folder")
    slots = plan_slots(graphs)
    with atomic_folder(out, overwrite=force) as tmp:
        if graphs.has_weights:
            _write_weights(tmp / WEIGHTS_FILE, graphs, slots)
        _bind(graphs, slots, tmp)
        for role, model in graphs.models.items():
            ir.save(model, tmp / f"{role}.onnx")
        if finish is not None:
            stage = {**stage, **finish(tmp)}
        opsets = {m.opset_imports.get("", graphs.manifest.opset) for m in graphs.models.values()}
        manifest = dataclasses.replace(
            graphs.manifest.with_stage(stage),
            graphs={role: (f"{role}.onnx" if role in graphs.models else None) for role in graphs.manifest.graphs},
            signatures={role: signature(m) for role, m in graphs.models.items()},
            opset=max(opsets),
            weights_file=WEIGHTS_FILE if graphs.has_weights else graphs.manifest.weights_file,
        )
        write_manifest(manifest, tmp)
    _bind(graphs, slots, out)
    manifest.folder = out
    graphs.manifest = manifest
    return manifest


# ---- weightless copies (dumps) ---------------------------------------------------------------------------


@contextmanager
def weights_declared(model: ir.Model) -> Iterator[ir.Model]:
    """Within the block, every weight of `model` is declared external data with no bytes read or computed."""
    saved = {}
    offset = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not is_weight(value) or tensor is None:
            continue
        saved[value] = tensor
        shape = static_dims(tensor.shape)
        nbytes = math.ceil(math.prod(shape) * tensor.dtype.bitwidth / 8)
        value.const_value = ir.ExternalTensor(
            WEIGHTS_FILE, offset, nbytes, tensor.dtype, shape=ir.Shape(shape), name=value.name or "", base_dir=""
        )
        offset += -(-nbytes // ALIGN) * ALIGN
    try:
        yield model
    finally:
        for value, tensor in saved.items():
            value.const_value = tensor
