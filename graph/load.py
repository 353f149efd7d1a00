"""Open ONNX files and export folders for inspection and diffing as onnx_ir models, without loading weight data.

`load_graph` parses the protobuf with `load_external_data=False` into an `ir.Model`, whose external tensors
stay lazy (onnx_ir maps a file only when a tensor's bytes are asked for), and describes every initializer
(dtype, shape, bytes, where its data lives) from the tensors' headers alone. External data is checked, never read:
a location that escapes the model's folder is refused; a missing or short data file (a `--weights none`
export) marks the tensor "missing" instead of failing. `iter_chunks` streams one tensor's data when a
caller needs numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
from dsv3c.artifact.names import MANIFEST_FILE
from dsv3c.artifact.weights import check_location
from dsv3c.errors import UserError
from dsv3c.onnxkit.dtypes import dtype_name, element_bytes, numpy_dtype
from google.protobuf.message import DecodeError

DataState = Literal["inline", "external", "missing"]
MANIFEST = MANIFEST_FILE

_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


@dataclass(frozen=True)
class TensorInfo:
    """One initializer, described from its proto: no data is read."""

    name: str
    elem_type: int
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    data: DataState
    location: str = ""  # external data file, relative to the model's folder
    offset: int = 0
    length: int = 0

    @property
    def dtype(self) -> str:
        return dtype_name(self.elem_type)


@dataclass(frozen=True)
class ExternalFile:
    location: str
    referenced_bytes: int
    tensors: int
    size: int | None  # None: the file does not exist


@dataclass
class LoadedGraph:
    """A parsed model plus what dsv3c knows about its initializers."""

    path: Path
    model: ir.Model
    role: str = ""
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    external_files: list[ExternalFile] = field(default_factory=list)

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    @property
    def initializers(self) -> dict[str, ir.Value]:
        return dict(self.model.graph.initializers)

    @property
    def has_all_data(self) -> bool:
        return all(t.data != "missing" for t in self.tensors.values())


def _describe(value: ir.Value, folder: Path, model: Path, sizes: dict[str, int | None]) -> TensorInfo:
    name = value.name or ""
    tensor = value.const_value
    if tensor is None:  # an initializer without a tensor: nothing to describe but its type
        dims = value.shape.dims if value.shape is not None else ()
        shape = tuple(int(d) if isinstance(d, int) else 0 for d in dims)
        elem_type = int(value.dtype) if value.dtype is not None else 0
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        return TensorInfo(name, elem_type, shape, numel, int(np.ceil(numel * element_bytes(elem_type))), "missing")
    elem_type = int(tensor.dtype)
    shape = tuple(int(d) for d in tensor.shape.numpy())
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    nbytes = int(np.ceil(numel * element_bytes(elem_type)))
    if not isinstance(tensor, ir.ExternalTensor):
        proto = tensor.raw if isinstance(tensor, ir.serde.TensorProtoTensor) else None
        present = (
            proto is None or bool(proto.raw_data) or numel == 0 or any(len(getattr(proto, f)) for f in _TYPED_FIELDS)
        )
        return TensorInfo(name, elem_type, shape, numel, nbytes, "inline" if present else "missing")
    location = str(tensor.location)
    offset = tensor.offset or 0
    length = tensor.length if tensor.length is not None else nbytes
    if offset < 0 or length < 0:
        raise UserError(f"{model}: initializer {name!r} has an invalid external data offset/length")
    if location not in sizes:
        target = check_location(folder, location, model)
        sizes[location] = target.stat().st_size if target.is_file() else None
    size = sizes[location]
    state: DataState = "external" if size is not None and size >= offset + length and length >= nbytes else "missing"
    return TensorInfo(name, elem_type, shape, numel, nbytes, state, location, offset, length)


def parse_model(path: Path) -> ir.Model:
    """The model at `path` as an `ir.Model`, external data not loaded (its tensors stay lazy); UserError for
    anything that is not an ONNX model."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file (expected an .onnx model or an export folder with {MANIFEST})")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise UserError(f"{path}: not an ONNX model, or truncated ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise UserError(f"{path}: not an ONNX model, or truncated (no ir_version, graph or opset_import)")
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:  # onnx_ir wraps what it cannot read (an external offset that is no integer, ...)
        cause = e.__cause__ or e
        raise UserError(f"{path}: not a valid ONNX model ({str(cause).strip().splitlines()[0][:300]})") from None
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model


def load_graph(path: Path, role: str = "") -> LoadedGraph:
    path = Path(path)
    model = parse_model(path)
    folder = path.resolve().parent
    sizes: dict[str, int | None] = {}
    tensors = {v.name or "": _describe(v, folder, path, sizes) for v in model.graph.initializers.values()}
    files = []
    for location, size in sizes.items():
        users = [t for t in tensors.values() if t.location == location]
        files.append(ExternalFile(location, sum(t.nbytes for t in users), len(users), size))
    return LoadedGraph(path, model, role, tensors, files)


# ---- export folders ------------------------------------------------------------------------------------


def read_export_manifest(folder: Path) -> tuple[dict[str, Path], dict[str, object]]:
    """Graphs of an export folder by role ({"prefill": folder/"prefill.onnx", ...}) and its cache layout.

    Reads through `dsv3c.artifact.manifest`, the format's owner, with one extra check: graph files stay inside.
    """
    from dsv3c.artifact.manifest import read_manifest

    manifest = read_manifest(folder)
    roles = {}
    for role, name in manifest.graphs.items():
        if name is not None:
            check_location(folder.resolve(), name, folder / MANIFEST)
            roles[role] = folder / name
    return roles, dataclasses.asdict(manifest.cache)


def graph_paths(path: Path) -> dict[str, Path]:
    """{role: .onnx path}: one entry with role "" for a file, the manifest's roles for an export folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise UserError(f"{path}: a folder without {MANIFEST}; pass an .onnx file or a dsv3c export folder")
        return read_export_manifest(path)[0]
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    return {"": path}


# ---- reading data, one tensor at a time -----------------------------------------------------------------


def iter_chunks(g: LoadedGraph, name: str, chunk: int = 1 << 22) -> Iterator[np.ndarray]:
    """The flat data of initializer `name` in pieces of at most `chunk` elements (streamed from disk)."""
    info = g.tensors[name]
    dtype = numpy_dtype(info.elem_type)
    if info.data == "missing" or dtype is None:
        raise ValueError(f"{name}: no readable data ({info.data}, {info.dtype})")
    if info.data == "inline":
        tensor = g.model.graph.initializers[name].const_value
        assert tensor is not None  # described "inline" above
        flat = tensor.numpy().reshape(-1)
        for start in range(0, max(flat.size, 1), chunk):
            yield flat[start : start + chunk]
        return
    with open(g.path.resolve().parent / info.location, "rb") as f:
        f.seek(info.offset)
        for start in range(0, info.numel, chunk):
            count = min(chunk, info.numel - start)
            raw = f.read(count * dtype.itemsize)
            yield np.frombuffer(raw, dtype=dtype)  # ONNX stores little-endian, as every host dsv3c runs on


def read_raw(g: LoadedGraph, name: str) -> bytes:
    """All bytes of one initializer's external or inline data, as ONNX raw_data (little-endian)."""
    return b"".join(np.ascontiguousarray(c).tobytes() for c in iter_chunks(g, name))
