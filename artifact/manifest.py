"""`manifest.json`: what an export folder holds. Everything that reads or writes export folders uses this.

    {
      "format_version": 1,
      "dsv3c_version": "0.1.0",
      "config": {...config.json...},
      "weights": "checkpoint" | "random" | "none",     # none: see below
      "weights_file": "weights.bin",
      "dtype": "float32" | "bfloat16",
      "opset": 21,
      "graphs": {"prefill": "prefill.onnx", "decode": "decode.onnx", "mtp": "mtp.onnx" | null,
                 "mtp.1": "mtp.1.onnx", ...},           # one graph per further MTP module (names.mtp_role)
      "signatures": {role: {"inputs": [{"name", "dtype", "shape"}], "outputs": [...]}},
      "cache": {...},                                   # the latent cache layout, see CacheLayout
      "stages": [{"stage": "export", "source": ..., "source_sha256": ..., ...}, ...]
    }

A pass that rewrites the folder appends its own stage (`Manifest.with_stage`) and writes it back.
Readers accept every version listed in READABLE_VERSIONS; a change of the format bumps FORMAT_VERSION
and adds a reader for the old one here, so old folders keep reading.

`weights: none` folders declare every weight (name, dtype, shape, and the external-data offset and
length it would have) but hold no data: `weights.bin` is an empty placeholder, so that
`onnx.checker.check_model(path)` accepts the graphs, while `onnx.load(path)` stops with "External data
... exceeds ..." instead of reading garbage. Work on structure with
`Manifest.load_structure(role)` (= `onnx.load(path, load_external_data=False)`) or `onnx_ir.load(path)`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import onnx
from dsv3c.artifact.atomic import write_text
from dsv3c.artifact.names import MANIFEST_FILE, ROLES
from dsv3c.errors import UserError

FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)
WeightsKind = Literal["checkpoint", "random", "none"]
WEIGHTS_KINDS = ("checkpoint", "random", "none")
APPEND_RULE = (
    "row b's past holds valid entries [0, positions[b, 0]); the runtime writes new entry i of row b at "
    "slot positions[b, i] and passes past = that buffer (entries at and beyond positions[b, 0] are ignored)"
)
# `lower --target ort` (--decode-cache in-place, passes/ort_cache_in_place.py): decode and MTP graphs write the cache
IN_PLACE_RULE = (
    "the step writes new entry i of row b at slot positions[b, i] of its past input and returns that buffer as "
    "present_ckv.N / present_kpe.N (bind them onto the past buffers to write in place); slots beyond "
    "positions[b, i] are ignored, so past must hold more than max(positions) slots; prefill returns its new "
    "entries, written by the runtime at slot positions[b, i]"
)
__all__ = [
    "APPEND_RULE",
    "FORMAT_VERSION",
    "IN_PLACE_RULE",
    "MANIFEST_FILE",
    "ROLES",
    "CacheLayout",
    "Manifest",
    "ManifestError",
    "Signature",
    "TensorInfo",
    "WeightsKind",
    "is_export_folder",
    "read_manifest",
    "write_manifest",
]


class ManifestError(UserError):
    """An export folder's manifest.json is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy-style name: "float32", "bfloat16", "int64"
    shape: list[int | str]  # ints, or symbolic names: batch, seq, q, past


@dataclass(frozen=True)
class Signature:
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


@dataclass(frozen=True)
class CacheLayout:
    """Per layer i: `past_ckv.{i}` [batch, past, ckv_width] and `past_kpe.{i}` [batch, past, kpe_width]."""

    layers: int  # decoder layers in decode.onnx
    mtp_layers: int  # MTP graphs (mtp, mtp.1, ...), each with its own one-layer cache; folders before chained
    # MTP have at most one (mtp), which reads the same
    ckv_width: int  # kv_lora_rank
    kpe_width: int  # qk_rope_head_dim
    dtype: str
    append_rule: str = APPEND_RULE

    @property
    def width(self) -> int:
        return self.ckv_width + self.kpe_width


@dataclass
class Manifest:
    config: dict[str, Any]  # config.json; DeepseekV3Config.from_dict(manifest.config) reads it
    weights: WeightsKind
    dtype: str
    opset: int
    graphs: dict[str, str | None]
    signatures: dict[str, Signature]
    cache: CacheLayout
    stages: list[dict[str, Any]]
    weights_file: str | None = "weights.bin"
    dsv3c_version: str = ""
    format_version: int = FORMAT_VERSION
    folder: Path | None = field(default=None, compare=False)

    def graph_path(self, role: str) -> Path:
        """The graph file for `role` (prefill, decode, mtp); ManifestError when the folder has none."""
        file = self.graphs.get(role)
        if file is None or self.folder is None:
            raise ManifestError(f"{self.folder}: this export has no {role} graph")
        return self.folder / file

    def load_structure(self, role: str) -> onnx.ModelProto:
        """The graph for `role` without its weights' bytes (works for every `weights` kind)."""
        return onnx.load(self.graph_path(role), load_external_data=False)

    def with_stage(self, stage: dict[str, Any]) -> Manifest:
        return dataclasses.replace(self, stages=[*self.stages, stage])

    def stage(self, name: str) -> dict[str, Any] | None:
        """The first stage called `name` (e.g. "export"), or None."""
        return next((s for s in self.stages if s.get("stage") == name), None)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("folder")
        d["cache"]["width"] = self.cache.width
        order = [
            "format_version",
            "dsv3c_version",
            "config",
            "weights",
            "weights_file",
            "dtype",
            "opset",
            "graphs",
            "signatures",
            "cache",
            "stages",
        ]
        return {k: d[k] for k in order}


def write_manifest(manifest: Manifest, folder: Path) -> None:
    """Write `folder/manifest.json` (atomically: a temporary sibling renamed over it)."""
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    write_text(Path(folder) / MANIFEST_FILE, text)


def is_export_folder(folder: Path) -> bool:
    """Whether `folder` holds a manifest.json that dsv3c wrote (checked by its keys, not validated)."""
    try:
        raw = json.loads((Path(folder) / MANIFEST_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(raw, dict) and "format_version" in raw and "dsv3c_version" in raw


def read_manifest(folder: str | Path) -> Manifest:
    """Read and check `folder/manifest.json`; ManifestError (one line) on anything wrong."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no such export folder")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{folder}: no {MANIFEST_FILE}; is this a folder written by 'dsv3c export'?") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise ManifestError(f"{path}: not valid JSON (nested too deep)") from None
    try:
        manifest = _parse(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(f"{path}: malformed ({type(e).__name__}: {e}); re-export the folder") from None
    manifest.folder = folder
    _check(manifest, path)
    return manifest


def _parse(raw: dict[str, Any]) -> Manifest:
    if not isinstance(raw, dict):
        raise TypeError("expected a JSON object")
    version = raw["format_version"]
    if version not in READABLE_VERSIONS:
        raise ValueError(f"format_version {version} is not {FORMAT_VERSION}; this dsv3c reads version {FORMAT_VERSION}")

    def tensors(items: list[dict[str, Any]]) -> list[TensorInfo]:
        return [TensorInfo(str(t["name"]), str(t["dtype"]), list(t["shape"])) for t in items]

    signatures = {role: Signature(tensors(s["inputs"]), tensors(s["outputs"])) for role, s in raw["signatures"].items()}
    cache = raw["cache"]
    return Manifest(
        config=dict(raw["config"]),
        weights=cast(WeightsKind, raw["weights"]),
        dtype=str(raw["dtype"]),
        opset=int(raw["opset"]),
        graphs={str(k): _file_name(v) for k, v in raw["graphs"].items()},
        signatures=signatures,
        cache=CacheLayout(
            int(cache["layers"]),
            int(cache["mtp_layers"]),
            int(cache["ckv_width"]),
            int(cache["kpe_width"]),
            str(cache["dtype"]),
            str(cache["append_rule"]),
        ),
        stages=[dict(stage) for stage in raw["stages"]],
        weights_file=_file_name(raw.get("weights_file")),
        dsv3c_version=str(raw["dsv3c_version"]),
        format_version=int(version),
    )


def _file_name(value: Any) -> str | None:
    """A file of the folder named by the manifest: a plain name (never a path out of the folder) or null."""
    if value is None:
        return None
    if not isinstance(value, str) or Path(value).name != value or value in ("", ".", "..") or "\0" in value:
        raise ValueError(f"{value!r} is not the name of a file in the folder")
    return value


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system: no such file can be in the folder
        return False


def _check(m: Manifest, path: Path) -> None:
    if m.weights not in WEIGHTS_KINDS:
        raise ManifestError(f"{path}: 'weights' must be checkpoint, random or none, got {m.weights!r}")
    for role in ("prefill", "decode"):
        if not m.graphs.get(role):
            raise ManifestError(f"{path}: no {role} graph listed under 'graphs'")
    assert m.folder is not None
    for role, file in m.graphs.items():
        if file is not None and not _is_file(m.folder / file):
            raise ManifestError(f"{path}: the {role} graph {file} is missing from the folder")
        if file is not None and role not in m.signatures:
            raise ManifestError(f"{path}: no signature for the {role} graph")
    if m.weights != "none" and m.weights_file and not _is_file(m.folder / m.weights_file):
        raise ManifestError(f"{path}: weights are '{m.weights}' but {m.weights_file} is missing")
