"""`engine_manifest.json`: what an engine folder holds, recorded at build time (no GPU needed to read it).

{
  "format_version": 1, "dsv3c_version": "0.1.0",
  "backend": {"name": "tensorrt_rtx", "version": "1.7.1.116", "onnx_parser_version": "..."},
  "precision": "fp32" | "bf16" | "fp8",
  "target_cc": ["8.0", ...],             # requested (empty: the backend's default set)
  "source": {"folder": ..., "preparation": ..., "stages": [...]},
  "config": {...}, "cache": {...},      # from the export manifest, for the runner
  "timing_cache": null | "path",
  "engines": {role: EngineRecord}       # file, bytes, sha256, build_seconds, inputs, outputs, profiles,
}                                       # engine_cc (from the file header), layers (LayerSummary)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3c.artifact.atomic import write_text
from dsv3c.artifact.fields import check_fields
from dsv3c.artifact.names import ENGINE_MANIFEST_FILE
from dsv3c.errors import UserError

ENGINE_MANIFEST = ENGINE_MANIFEST_FILE
FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)


@dataclass(frozen=True)
class ShapeRange:
    """One input's (min, opt, max) shapes in an optimization profile."""

    min: list[int]
    opt: list[int]
    max: list[int]


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str  # numpy-style: float32, bfloat16, int64, float8_e4m3fn
    shape: list[int | str]  # -1 in the engine shown by the export's symbolic names


@dataclass
class LayerSummary:
    """The parsed network before building: what TensorRT was given (layer names are ONNX node names)."""

    total: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    fp8: list[str] = field(default_factory=list)  # layers producing or consuming fp8 tensors (Q/DQ, weights)
    fp8_gemms: list[str] = field(default_factory=list)  # matmuls with both operands dequantized from fp8
    fp8_weight_gemms: list[str] = field(default_factory=list)  # matmuls with an fp8 weight, float activation
    attention: list[str] = field(default_factory=list)  # native IAttention (ATTENTION_INPUT layer names)
    rotary: list[str] = field(default_factory=list)  # native ROTARY_EMBEDDING
    moe: list[str] = field(default_factory=list)  # native MOE
    kv_cache_update: list[str] = field(default_factory=list)
    dynamic_quantize: list[str] = field(default_factory=list)
    attention_decomposable: bool = False  # set when no fused kernel existed and TensorRT may decompose


@dataclass
class EngineRecord:
    role: str
    file: str
    bytes: int
    sha256: str
    build_seconds: float
    inputs: list[TensorRecord]
    outputs: list[TensorRecord]
    profiles: list[dict[str, ShapeRange]]
    layers: LayerSummary
    engine_cc: list[str]  # read back from the serialized engine's header


@dataclass
class EngineManifest:
    backend: dict[str, str]
    precision: str
    target_cc: list[str]
    source: dict[str, Any]
    config: dict[str, Any]
    cache: dict[str, Any]
    engines: dict[str, EngineRecord]
    timing_cache: str | None = None
    dsv3c_version: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        first = ["format_version", "dsv3c_version", "backend", "precision", "target_cc"]
        return {k: d[k] for k in [*first, *(k for k in d if k not in first)]}


def write_engine_manifest(manifest: EngineManifest, folder: Path) -> None:
    """Write `folder/engine_manifest.json` (atomically)."""
    write_text(Path(folder) / ENGINE_MANIFEST, json.dumps(manifest.to_dict(), indent=1) + "\n")


def read_engine_manifest(folder: Path) -> EngineManifest:
    """Read and check `folder/engine_manifest.json`; UserError (one line) on anything wrong."""
    path = Path(folder) / ENGINE_MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder}: no {ENGINE_MANIFEST}; is this a folder written by 'dsv3c build'?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    try:
        if raw["format_version"] not in READABLE_VERSIONS:
            raise ValueError(f"format_version {raw['format_version']}, this dsv3c reads {FORMAT_VERSION}")
        engines = {role: _engine(e) for role, e in raw["engines"].items()}
        manifest = EngineManifest(**{**raw, "engines": engines})
        _check(manifest)
        return manifest
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: malformed ({type(e).__name__}: {e}); rebuild the folder") from None


def _check(manifest: EngineManifest) -> None:
    """ValueError for what the readers (inspect, the runner) could not use: a field of another type, an engine
    file that is not a plain name in the folder (never a path out of it), profile ranges of unequal lengths."""
    check_fields(manifest)  # a hand-edited file fails here, in one line, not where a wrong type is first used
    if not {"name", "version"} <= set(manifest.backend):
        raise ValueError("backend needs its name and version")
    for record in manifest.engines.values():
        name = record.file
        if Path(name).name != name or name in ("", ".", "..") or "\0" in name or len(name.encode()) > 255:
            raise ValueError(f"engine file {name[:80]!r} is not the name of a file in the folder")
        for dims, r in (item for profile in record.profiles for item in profile.items()):
            if not len(r.min) == len(r.opt) == len(r.max):
                raise ValueError(f"{record.role} profile of {dims}: min, opt and max differ in length")


def _engine(raw: dict[str, Any]) -> EngineRecord:
    def tensors(items: list[dict[str, Any]]) -> list[TensorRecord]:
        return [TensorRecord(**t) for t in items]

    profiles = [{name: ShapeRange(**r) for name, r in p.items()} for p in raw["profiles"]]
    fields = {**raw, "inputs": tensors(raw["inputs"]), "outputs": tensors(raw["outputs"])}
    return EngineRecord(**{**fields, "profiles": profiles, "layers": LayerSummary(**raw["layers"])})
