"""What an engine folder holds, without a GPU: engine_manifest.json plus each engine file's header.

    report = inspect_engine_folder(Path("engines"), target_cc=["8.9"])
    print(render_text(report))        # or render_json(report)

`dsv3c inspect` dispatches here for folders with engine_manifest.json (cli/inspect_kinds.py's handler list).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from dsv3c.artifact.engine_manifest import EngineRecord, LayerSummary, ShapeRange, TensorRecord, read_engine_manifest
from dsv3c.errors import UserError
from dsv3c.runtime.trt.header import EngineHeader, read_header
from dsv3c.runtime.trt.profiles import dim_ranges


@dataclass
class EngineReport:
    role: str
    file: str
    bytes: int  # on disk
    build_seconds: float
    header: EngineHeader
    inputs: list[TensorRecord]
    outputs: list[TensorRecord]
    profiles: list[dict[str, ShapeRange]]
    layers: LayerSummary
    problems: list[str] = field(default_factory=list)  # missing file, size or header mismatch


@dataclass
class EngineFolderReport:
    folder: str
    backend: str  # "tensorrt_rtx 1.7.1.116"
    installed_backend: str | None  # what this machine would deserialize with (None: none installed)
    precision: str
    target_cc: list[str]  # as requested at build time (empty: the backend's default set)
    engine_cc: list[str]  # common to every engine, from the headers
    total_bytes: int
    engines: list[EngineReport]
    check_cc: list[str] = field(default_factory=list)  # the targets checked (inspect --target-cc)
    valid: bool | None = None  # None: nothing checked
    validity: list[str] = field(default_factory=list)  # reasons, one line each


def inspect_engine_folder(folder: Path, target_cc: list[str] | None = None) -> EngineFolderReport:
    folder = Path(folder)
    manifest = read_engine_manifest(folder)
    engines = [_engine(folder, record.role, record) for record in manifest.engines.values()]
    ccs = [set(e.header.cc) for e in engines if e.header.recognized]
    engine_cc = sorted(set.intersection(*ccs), key=_cc_key) if ccs else list(manifest.target_cc)
    report = EngineFolderReport(
        folder=str(folder),
        backend=f"{manifest.backend['name']} {manifest.backend['version']}",
        installed_backend=_installed(),
        precision=manifest.precision,
        target_cc=manifest.target_cc,
        engine_cc=engine_cc,
        total_bytes=sum(e.bytes for e in engines),
        engines=engines,
    )
    if target_cc:
        _check_validity(report, manifest.backend, target_cc)
    return report


def _engine(folder: Path, role: str, record: EngineRecord) -> EngineReport:
    path = folder / record.file
    problems = []
    if not path.is_file():
        problems.append(f"{record.file} is missing")
        header, size = EngineHeader(False, note="file missing"), 0
    else:
        header, size = read_header(path), path.stat().st_size
        if size != record.bytes:
            problems.append(f"{record.file} has {size} bytes, the manifest recorded {record.bytes}")
        if header.recognized and header.size != size:
            problems.append(f"{record.file}: header says {header.size} bytes, the file has {size} (truncated?)")
    return EngineReport(
        role,
        record.file,
        size,
        record.build_seconds,
        header,
        record.inputs,
        record.outputs,
        record.profiles,
        record.layers,
        problems,
    )


def _installed() -> str | None:
    from dsv3c.runtime.trt.backend import load_backend

    try:
        return load_backend().describe()
    except UserError:
        return None


def _check_validity(report: EngineFolderReport, backend: dict[str, str], target_cc: list[str]) -> None:
    report.check_cc = list(target_cc)
    reasons = []
    missing = [cc for cc in target_cc if cc not in report.engine_cc]
    if missing:
        reasons.append(
            f"compute capability {', '.join(missing)} is not among the engines' targets "
            f"({', '.join(report.engine_cc) or 'unknown'})"
        )
    for e in report.engines:
        reasons += [f"{e.role}: {p}" for p in e.problems]
    built = f"{backend['name']} {backend['version']}"
    if report.installed_backend and report.installed_backend != built:
        reasons.append(f"built with {built}, this machine has {report.installed_backend} (engines need the same)")
    report.valid = not reasons
    report.validity = reasons


def _cc_key(cc: str) -> tuple[int, ...]:
    return tuple(int(p) for p in cc.split("."))


# ---- rendering ----------------------------------------------------------------------------------------


def render_json(report: EngineFolderReport) -> str:
    return json.dumps(dataclasses.asdict(report), indent=1) + "\n"


def _names(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return f"{len(items)}" + (f" ({shown}{', ...' if len(items) > limit else ''})" if items else "")


def _shape(t: TensorRecord) -> str:
    return f"{t.name} {t.dtype}[{', '.join(str(d) for d in t.shape)}]"


def render_text(report: EngineFolderReport) -> str:
    mib = report.total_bytes / 2**20
    lines = [
        f"engine folder {report.folder}: {len(report.engines)} engines, {mib:.1f} MiB, {report.precision}",
        f"  backend     {report.backend} (installed here: {report.installed_backend or 'none'})",
        f"  targets     {', '.join(report.engine_cc) or 'unknown'}"
        + (f" (requested {', '.join(report.target_cc)})" if report.target_cc else " (backend default set)"),
    ]
    if report.valid is not None:
        verdict = "valid" if report.valid else "NOT valid: " + "; ".join(report.validity)
        lines.append(f"  check {', '.join(report.check_cc)}: {verdict}")
    for e in report.engines:
        s = e.layers
        lines.append(
            f"{e.role}: {e.file} {e.bytes / 2**20:.1f} MiB, built in {e.build_seconds:.2f} s, "
            f"header {e.header.version or e.header.note}"
        )
        lines += [f"  ! {p}" for p in e.problems]
        lines.append("  inputs   " + "; ".join(_shape(t) for t in e.inputs))
        lines.append("  outputs  " + "; ".join(_shape(t) for t in e.outputs))
        shapes = {t.name: t.shape for t in e.inputs}
        for i, profile in enumerate(e.profiles):
            ranges = [f"{n} {lo}..{opt}..{hi}" for n, (lo, opt, hi) in dim_ranges(shapes, profile).items()]
            lines.append(f"  profile {i}: min..opt..max " + "; ".join(ranges))
        top = ", ".join(f"{k} {v}" for k, v in list(s.by_type.items())[:8])
        lines.append(f"  layers   {s.total}: {top}{', ...' if len(s.by_type) > 8 else ''}")
        lines.append(
            f"  fp8      layers {_names(s.fp8)}; fp8 GEMMs {_names(s.fp8_gemms)}; "
            f"weight-only fp8 GEMMs {_names(s.fp8_weight_gemms)}"
        )
        decomposed = " (TensorRT may decompose: no fused kernel)" if s.attention_decomposable else ""
        lines.append(
            f"  native   attention {_names(s.attention)}{decomposed}; rotary {_names(s.rotary)}; "
            f"moe {_names(s.moe)}; dynamic quantize {_names(s.dynamic_quantize)}"
        )
    return "\n".join(lines) + "\n"
