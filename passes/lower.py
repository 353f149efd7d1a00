"""Lower an export folder to a target: read -> the target's pipeline -> write (-> MLIR for iree).

With 8-bit weights (ort), the stage also records the error the lowering adds: every graph of the written
folder against the same graph of the source folder, both in onnxruntime on seeded random inputs
(ort_run.random_feeds), as ||lowered - source|| / ||source|| per output.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from dsv3c import progress
from dsv3c.artifact.export_folder import ExportGraphs, plan_slots, read_export, write_export
from dsv3c.artifact.manifest import IN_PLACE_RULE, Manifest
from dsv3c.errors import UserError
from dsv3c.models.fp8 import DEFAULT_BLOCK, Block
from dsv3c.passes.lower_ort_8bit import Int8Options
from dsv3c.passes.mlir import CompileTarget, compile_mlir, import_onnx
from dsv3c.passes.ort_run import FeedShape, GraphRunner, random_feeds, relative_error
from dsv3c.passes.pipelines import DecodeCache, Target, lower_pipeline
from dsv3c.passes.stages import run_pipeline


def lower_folder(
    src: Path,
    out: Path,
    target: Target,
    *,
    dims: dict[str, int] | None = None,
    emit_mlir: bool = False,
    compile_for: CompileTarget | None = None,
    dump_dir: Path | None = None,
    force: bool = False,
    weights_8bit: int | None = None,
    linears_8bit: bool = True,
    mxfp8: bool = False,
    mxfp8_weights: bool = False,
    ort_fusions: bool = True,
    decode_cache: DecodeCache = DecodeCache.IN_PLACE,
    shared_experts_in_moe: bool = True,
) -> Manifest:
    """Write `out`: the export folder `src` lowered to `target` (plus `{role}.mlir` with emit_mlir);
    `weights_8bit`: the block size of 8-bit weights (ort only), for the experts and, with `linears_8bit`, the
    linears; `mxfp8`: online activation scales as
    MXFP8 (lower_mxfp8.py; not for iree); `compile_for`: also `{role}.vmfb`, the MLIR compiled by iree-compile;
    `ort_fusions=False`: ort without the fused norms (to measure what they gain); `decode_cache` (ort): how
    decode meets its new cache entries (pipelines.DecodeCache; in place, the manifest's cache.append_rule
    says so); `shared_experts_in_moe=False`: the shared experts as MatMuls, not experts of com.microsoft::MoE."""
    emit_mlir = emit_mlir or compile_for is not None
    if mxfp8_weights and not mxfp8:
        raise UserError("--mxfp8-weights pairs the weights with MXFP8 activations; pass --activations mxfp8 too")
    if mxfp8 and target == Target.IREE:
        raise UserError("--activations mxfp8: IREE cannot take blocked Q/DQ; use --target trt, ort or portable")
    if weights_8bit is not None and target != Target.ORT:
        raise UserError("--weights-8bit stores weights for onnxruntime's kernels; use it with --target ort")
    if emit_mlir and target != Target.IREE:
        raise UserError("--emit mlir goes through IREE's importer; use it with --target iree")
    if dims and target != Target.IREE:
        raise UserError("--shape fixes dimensions for --target iree only")
    graphs = read_export(src)
    lowered = [s for s in graphs.manifest.stages if s.get("stage") == "lower"]
    if lowered:
        raise UserError(f"{src} is lowered already (to {lowered[-1].get('target')}); lower the canonical export")
    symbolic = {
        str(d)
        for sig in graphs.manifest.signatures.values()
        for t in sig.inputs
        for d in t.shape
        if not isinstance(d, int)
    }
    unknown = sorted(set(dims or {}) - symbolic)
    if unknown:
        known = ", ".join(sorted(symbolic))
        raise UserError(f"--shape: no graph has a dimension named {', '.join(unknown)}; the dimensions are {known}")
    if emit_mlir and not graphs.has_weights:
        raise UserError(f"{src} has no weights (--weights none); MLIR embeds the weights, so it needs them")
    int8 = None
    if weights_8bit is not None:
        if weights_8bit < 16 or weights_8bit & (weights_8bit - 1):
            raise UserError(f"--block-8bit {weights_8bit}: the kernels take a power of two >= 16 (e.g. 32, 128)")
        int8 = Int8Options(weights_8bit, fp8_block(graphs), linears=linears_8bit)
    stages = lower_pipeline(
        target,
        dims,
        int8,
        mxfp8,
        mxfp8_weights,
        ort_fusions,
        decode_cache,
        shared_experts_in_moe,
    )
    records = run_pipeline(graphs, stages, dump_dir)
    if target == Target.ORT and decode_cache == DecodeCache.IN_PLACE:
        graphs.manifest.cache = dataclasses.replace(graphs.manifest.cache, append_rule=IN_PLACE_RULE)
    stage = {
        "stage": "lower",
        "target": target.value,
        "pipeline": [s.name for s in stages],
        **({"dims": dims} if dims else {}),
        **({"weights_8bit": int8.to_dict()} if int8 is not None else {}),
        **({"activations": "mxfp8", "mxfp8_weights": mxfp8_weights} if mxfp8 else {}),
        "changes": {r.name: r.changes for r in records if r.changes},
    }

    def finish(folder: Path) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if emit_mlir:
            files = {role: import_onnx(folder / f"{role}.onnx", folder / f"{role}.mlir") for role in graphs.models}
            extra["mlir"] = {role: path.name for role, path in files.items()}
        if compile_for is not None:
            vmfbs = {role: compile_mlir(mlir, folder / f"{role}.vmfb", compile_for) for role, mlir in files.items()}
            extra["vmfb"] = {**compile_for.to_dict(), "files": {role: path.name for role, path in vmfbs.items()}}
        if int8 is not None:
            extra["error_vs_source"] = error_vs_source(src, graphs, folder)
        return extra

    with progress.task("writing weights", plan_slots(graphs).total, unit="bytes") as bar:
        return write_export(
            graphs,
            out,
            stage,
            force=force,
            finish=finish if emit_mlir or int8 else None,
            on_write=lambda _, n: bar.advance(n),
        )


def fp8_block(graphs: ExportGraphs) -> Block:
    """The FP8 block shape of an FP8 export (its checkpoint's) or of a quantized one (its quantize stage's
    options), else DeepSeek's."""
    for stage in graphs.manifest.stages:
        if stage.get("stage") in ("export", "quantize"):
            block = stage.get("fp8_block") if stage.get("stage") == "export" else stage.get("options", {}).get("block")
            if isinstance(block, list) and len(block) == 2:
                return int(block[0]), int(block[1])
    return DEFAULT_BLOCK


ERROR_FEEDS = FeedShape(batch=2, seq=8, decode_seq=1, past=8)
ERROR_SEED = 0


def error_vs_source(src: Path, lowered: ExportGraphs, folder: Path) -> dict[str, Any]:
    """Relative error of every output of every lowered graph (weights in `folder`) against the source
    folder's graph, on the same seeded random inputs. For logits also per token (the median over tokens:
    a token whose routing flips to another expert has a large error of its own) and top-1 agreement."""
    if not lowered.has_weights:
        return {"measured": False, "reason": "the folder has no weights (--weights none)"}
    if lowered.manifest.cache.dtype != "float32":  # the bf16 graphs' Mul alone has no CPU kernel
        return {"measured": False, "reason": f"onnxruntime's CPU provider runs no {lowered.manifest.cache.dtype} graph"}
    source = read_export(src)
    errors: dict[str, dict[str, float]] = {}
    logits: dict[str, dict[str, float]] = {}
    for role, model in lowered.models.items():
        feeds = random_feeds(source.manifest, role, np.random.default_rng(ERROR_SEED), ERROR_FEEDS)
        want = GraphRunner(source.models[role], src).run(feeds)
        got = GraphRunner(model, folder).run(feeds)
        errors[role] = {name: relative_error(got[name], value) for name, value in want.items()}
        if "logits" in want:
            a, b = np.asarray(got["logits"], np.float64), np.asarray(want["logits"], np.float64)
            per_token = np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-30)
            logits[role] = {
                "relative": errors[role]["logits"],
                "median_token": float(np.median(per_token)),
                "max_token": float(per_token.max()),
                "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
            }
    return {
        "measured": True,
        "metric": "||lowered - source|| / ||source|| (Frobenius; onnxruntime CPU)",
        "seed": ERROR_SEED,
        "feeds": vars(ERROR_FEEDS),
        "max_logits": max((d["relative"] for d in logits.values()), default=0.0),
        "max_median_token_logits": max((d["median_token"] for d in logits.values()), default=0.0),
        "max": max((e for role in errors.values() for e in role.values()), default=0.0),
        "logits": logits,
        "outputs": errors,
    }
