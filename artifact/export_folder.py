"""An export folder as onnx_ir models: read one, transform it, write a new one with one weights file.

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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir
from dsv3c.artifact.atomic import atomic_folder
from dsv3c.artifact.manifest import Manifest, Signature, TensorInfo, read_manifest, write_manifest
from dsv3c.artifact.names import DOMAIN, PRODUCER, WEIGHTS_FILE
from dsv3c.artifact.weights import Layout, WeightsWriter, check_location
from dsv3c.errors import UserError

_WEIGHT_KEY = "dsv3c.weight"
__all__ = [
    "ExportGraphs",
    "check_external_data",
    "is_weight",
    "mark_weight",
    "read_export",
    "signature",
    "weights_declared",
    "write_export",
]


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
        if DOMAIN not in model.opset_imports and model.producer_name != PRODUCER:
            raise UserError(f"{path}: not a dsv3c graph (no '{DOMAIN}' opset, producer {model.producer_name!r})")
        for value in model.graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                _check_external(Path(folder), value.const_value, path, manifest.weights != "none")
                mark_weight(value)
        models[role] = model
    return ExportGraphs(manifest, models)


def _check_external(folder: Path, tensor: ir.ExternalTensor, graph: Path, has_data: bool) -> None:
    """One line, before any pass reads it, for external data that escapes the folder or lies past a file's end
    (a `--weights none` folder declares its weights in an empty placeholder: only the location is checked)."""
    target = check_location(folder, tensor.location, graph)
    if not has_data:
        return
    if not target.is_file():
        raise UserError(
            f"{graph}: weight {tensor.name} is in {tensor.location}, which is missing; re-export the folder"
        )
    size, offset = target.stat().st_size, tensor.offset or 0
    length = tensor.length if tensor.length is not None else tensor.nbytes
    if offset < 0 or length != tensor.nbytes or offset + length > size:
        raise UserError(
            f"{graph}: weight {tensor.name} needs bytes {offset}..{offset + length} of {tensor.location} "
            f"({size} bytes; {tensor.nbytes} for its dtype and shape): truncated or corrupt, re-export the folder"
        )


def check_external_data(graph: Path) -> None:
    """UserError (one line) when an initializer of the ONNX file `graph` has external data outside its folder
    or past the end of its file: what a runtime would otherwise report in several lines of its own."""
    import onnx

    try:
        proto = onnx.load(graph, load_external_data=False)
    except Exception as e:  # protobuf and onnx raise several types; report one line
        raise UserError(f"{graph}: not a readable ONNX file ({type(e).__name__}: {str(e)[:200]})") from None
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        target = check_location(graph.parent, info.get("location", ""), graph)
        try:
            offset, length = int(info.get("offset", 0)), int(info["length"]) if "length" in info else None
        except ValueError:
            raise UserError(f"{graph}: weight {t.name} has an invalid external data offset/length") from None
        size = target.stat().st_size if target.is_file() else -1
        if size < 0 or offset < 0 or (length is not None and (length < 0 or offset + length > size)):
            raise UserError(
                f"{graph}: weight {t.name} lies past the end of {info.get('location')} "
                f"({max(size, 0)} bytes): the file is truncated or missing; re-export the folder"
            )


# ---- writing -------------------------------------------------------------------------------------------


def _static(shape: ir.ShapeProtocol) -> tuple[int, ...]:
    if not all(isinstance(d, int) for d in shape.dims):
        raise ValueError(f"bug: a weight with a symbolic shape {shape}")
    return tuple(int(d) for d in shape.dims)  # type: ignore[arg-type]


def _weights(models: Iterable[ir.Model]) -> Iterator[ir.Value]:
    for model in models:
        for value in model.graph.initializers.values():
            if is_weight(value):
                yield value


def plan_slots(graphs: ExportGraphs) -> Layout:
    """One aligned slot per weight name, in first-seen order; a name must mean one dtype and shape."""
    layout = Layout()
    for value in _weights(graphs.models.values()):
        tensor = value.const_value
        assert value.name is not None and tensor is not None
        layout.add(value.name, tensor.dtype, _static(tensor.shape))
    return layout


def _write_weights(
    path: Path, graphs: ExportGraphs, layout: Layout, on_write: Callable[[str, int], None] | None = None
) -> None:
    with WeightsWriter(path, layout) as writer:
        done: set[str] = set()
        for value in _weights(graphs.models.values()):
            assert value.name is not None and value.const_value is not None
            if value.name not in done:
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor):  # from the source's mapped pages, no copy; then unmapped,
                    writer.write(value.name, tensor.numpy())  # so memory holds one tensor whatever the folder's size
                    tensor.release()
                else:
                    writer.write(value.name, tensor.tobytes())  # one tensor in memory at a time
                done.add(value.name)
                if on_write is not None:
                    on_write(value.name, layout.slots[value.name].nbytes)


def _bind(graphs: ExportGraphs, layout: Layout, folder: Path) -> None:
    """Point every weight at its slot of `folder/weights.bin` (which may not exist: weightless folders)."""
    for value in _weights(graphs.models.values()):
        assert value.name is not None
        value.const_value = layout.external_tensor(value.name, folder)


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
    on_write: Callable[[str, int], None] | None = None,
) -> Manifest:
    """Write `graphs` as the export folder `out` (atomically) with `stage` appended to the manifest.

    `on_write(name, nbytes)` is called after each weight is written (progress bars; `plan_slots(graphs).total`
    is the weights file's size).

    `finish(folder)`, when given, runs on the written (temporary) folder before the manifest and returns
    entries to add to the stage (e.g. files it wrote). Afterwards the models' weights refer to
    `out/weights.bin`; the returned manifest has its folder set. `out` must not overlap the input folder.
    """
    out = Path(out)
    layout = plan_slots(graphs)
    with atomic_folder(out, force, inputs=[graphs.folder]) as tmp:
        if graphs.has_weights:
            _write_weights(tmp / WEIGHTS_FILE, graphs, layout, on_write)
        _bind(graphs, layout, tmp)
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
    _bind(graphs, layout, out)
    manifest.folder = out
    graphs.manifest = manifest
    return manifest


# ---- weightless copies (dumps) ---------------------------------------------------------------------------


@contextmanager
def weights_declared(model: ir.Model) -> Iterator[ir.Model]:
    """Within the block, every weight of `model` is declared external data with no bytes read or computed."""
    saved = {}
    layout = Layout()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not is_weight(value) or tensor is None:
            continue
        saved[value] = tensor
        name = value.name or ""
        layout.add(name, tensor.dtype, _static(tensor.shape))
        value.const_value = layout.external_tensor(name, "")
    try:
        yield model
    finally:
        for value, tensor in saved.items():
            value.const_value = tensor
