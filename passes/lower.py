"""Lower an export folder to a target: read -> the target's pipeline -> write (-> MLIR for iree)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsv3c.errors import UserError
from dsv3c.export.manifest import Manifest
from dsv3c.passes.export_io import read_export, write_export
from dsv3c.passes.mlir import import_onnx
from dsv3c.passes.pipeline import run_pipeline
from dsv3c.passes.pipelines import Target, lower_pipeline


def lower_folder(src: Path, out: Path, target: Target, *, dims: dict[str, int] | None = None, emit_mlir: bool = False,
                 dump_dir: Path | None = None, force: bool = False) -> Manifest:  # fmt: skip
    """Write `out`: the export folder `src` lowered to `target` (plus `{role}.mlir` with emit_mlir)."""
    if emit_mlir and target != Target.IREE:
        raise UserError("--emit mlir goes through IREE's importer; use it with --target iree")
    if dims and target != Target.IREE:
        raise UserError("--shape fixes dimensions for --target iree only")
    graphs = read_export(src)
    lowered = [s for s in graphs.manifest.stages if s.get("stage") == "lower"]
    if lowered:
        raise UserError(f"{src} is lowered already (to {lowered[-1].get('target')}); lower the canonical export")
    symbolic = {str(d) for sig in graphs.manifest.signatures.values() for t in sig.inputs for d in t.shape
                if not isinstance(d, int)}  # fmt: skip
    unknown = sorted(set(dims or {}) - symbolic)
    if unknown:
        known = ", ".join(sorted(symbolic))
        raise UserError(f"--shape: no graph has a dimension named {', '.join(unknown)}; the dimensions are {known}")
    if emit_mlir and not graphs.has_weights:
        raise UserError(f"{src} has no weights (--weights none); MLIR embeds the weights, so it needs them")
    stages = lower_pipeline(target, dims)
    records = run_pipeline(graphs, stages, dump_dir)
    stage = {
        "stage": "lower",
        "target": target.value,
        "pipeline": [s.name for s in stages],
        **({"dims": dims} if dims else {}),
        "changes": {r.name: r.changes for r in records if r.changes},
    }

    def mlir(folder: Path) -> dict[str, Any]:
        files = {role: import_onnx(folder / f"{role}.onnx", folder / f"{role}.mlir") for role in graphs.models}
        return {"mlir": {role: path.name for role, path in files.items()}}

    return write_export(graphs, out, stage, force=force, finish=mlir if emit_mlir else None)
