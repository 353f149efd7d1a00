"""Quantize an export folder: read -> (calibrate) -> the quantize pipeline -> write a new folder."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from dsv3c import progress
from dsv3c.artifact.export_folder import ExportGraphs, plan_slots, read_export, write_export
from dsv3c.artifact.manifest import Manifest
from dsv3c.errors import UserError
from dsv3c.onnxkit.linears import LinearKind, rewritable_linears
from dsv3c.passes.calibrate import calibrate as run_calibration
from dsv3c.passes.calibrate import calibration_record
from dsv3c.passes.fp8_math import ActScheme, WeightScheme
from dsv3c.passes.fp8_weights import Fp8WeightsPass
from dsv3c.passes.pipelines import QuantizeOptions, quantize_pipeline
from dsv3c.passes.stages import run_pipeline


def linear_names(graphs: ExportGraphs) -> dict[str, LinearKind]:
    """Every linear weight name of every graph, with its kind."""
    return {lin.name: lin.kind for model in graphs.models.values() for lin in rewritable_linears(model.graph)}


def quantize_folder(
    src: Path,
    out: Path,
    options: QuantizeOptions,
    *,
    calibrate: int = 0,
    seed: int = 0,
    calibration_text: Sequence[np.ndarray] | None = None,
    dump_dir: Path | None = None,
    force: bool = False,
) -> Manifest:
    """Write `out`, the FP8 version of the export folder `src`; returns its manifest."""
    graphs = read_export(src)
    if any(s.get("stage") == "quantize" for s in graphs.manifest.stages):
        raise UserError(f"{src} is quantized already (its manifest has a 'quantize' stage); quantize the export")
    if any(s.get("stage") == "lower" for s in graphs.manifest.stages):
        raise UserError(f"{src} is lowered; quantize the canonical export, then lower the quantized folder")
    names = linear_names(graphs)
    options.policy.check(names)
    selected = {n for n in names if options.policy.selects(n)}
    stage_extra = {}
    if calibrate:
        if options.activations != ActScheme.STATIC:
            raise UserError("--calibrate sets static activation scales; it cannot be combined with online scales")
        matmuls = {n for n in selected if names[n] == LinearKind.MATMUL}
        amax = run_calibration(graphs, matmuls, calibrate, seed, text=calibration_text)
        options = dataclasses.replace(options, static_amax=amax)
        stage_extra = {"calibration": {**calibration_record(calibrate, seed, calibration_text), "amax": amax}}
    elif options.activations == ActScheme.STATIC and not options.static_amax:
        raise UserError("static activation scales need --calibrate N")
    stages = quantize_pipeline(options)
    records = run_pipeline(graphs, stages, dump_dir)
    quantizer = next(s.pass_.quantizer for s in stages if isinstance(s.pass_, Fp8WeightsPass))
    stage = {
        "stage": "quantize",
        "pipeline": [s.name for s in stages],
        "options": options.to_dict(),
        **stage_extra,
        "fp8_linears": sorted(selected),
        "changes": {r.name: r.changes for r in records if r.changes},
    }

    def weights_record(_: Path) -> dict[str, Any]:  # after the weights are written (they are computed lazily)
        kept = sorted({n for r in records for c in r.changes.values() for n in c.get("kept_fp8", [])})
        record: dict[str, Any] = {"fp8_kept": kept}  # FP8 in the export already: bytes and scales as they were
        if options.weights == WeightScheme.BLOCK:
            # the fallback for float exports of FP8 weights: blocks that looked like an fp8 grid, and
            # whether re-quantizing reproduced them exactly (those not reproduced moved)
            record["grid_recognition"] = {**quantizer.grid.to_dict(), "weights_moved": sorted(quantizer.moved)}
        return record

    with progress.task("writing weights", plan_slots(graphs).total, unit="bytes") as bar:
        return write_export(
            graphs, out, stage, force=force, finish=weights_record, on_write=lambda _, n: bar.advance(n)
        )
