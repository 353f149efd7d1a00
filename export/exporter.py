"""Export a source (checkpoint, config-only folder or preset) into a folder of canonical ONNX graphs.

    OUT/prefill.onnx   input_ids, positions -> logits, hidden, new_ckv.{i}, new_kpe.{i}   (naive MLA)
    OUT/decode.onnx    ... + past_ckv.{i}, past_kpe.{i} -> the same                       (absorbed MLA)
    OUT/mtp.onnx       next_ids, hidden, positions, past_ckv.0, past_kpe.0 -> logits, hidden_out, new_*.0 (MTP)
    OUT/mtp.{d}.onnx   the same for MTP module d >= 1 (hidden: module d-1's hidden_out), one per module
    OUT/weights.bin    every weight once, referenced by all graphs (--weights none: an empty placeholder)
    OUT/manifest.json  see manifest.py

The pipeline is `export()`: trace on meta -> lay out the weights -> bind, finish and save each graph ->
write the weights -> write the manifest. Everything is written into a temporary sibling folder that is
renamed into place at the end, so an interrupted export leaves nothing behind. Same input, same bytes.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import dsv3c
import onnx
import torch
from dsv3c import progress
from dsv3c.artifact.atomic import atomic_folder
from dsv3c.artifact.manifest import CacheLayout, Manifest, Signature, TensorInfo, WeightsKind, write_manifest
from dsv3c.artifact.names import PRODUCER, ROLES, WEIGHTS_FILE, mtp_roles
from dsv3c.artifact.weights import Layout
from dsv3c.errors import CheckpointError, UserError
from dsv3c.export.checkpoint_fp8 import Fp8Plan, layout_for, plan_fp8, to_fp8_form, write_weights
from dsv3c.export.functions import attach_functions
from dsv3c.export.onnx_ops import register_schemas
from dsv3c.export.source import Source, config_sha256, sha256_files
from dsv3c.export.trace import DEFAULT_OPSET, TracedGraph, trace_graphs
from dsv3c.models.checkpoint import CheckpointIndex, load_state_dict_streaming, read_index
from dsv3c.models.checkpoint_layout import BIAS_FP32, SCALE_SUFFIX, parameter_shapes
from dsv3c.models.checkpoint_save import random_state
from dsv3c.models.config import DeepseekV3Config

ExportDtype = Literal["fp32", "bf16"]
Fp8Mode = Literal["keep", "dequantize"]  # an FP8 checkpoint's weights: as they are, or in the export's dtype
TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ONNX_DTYPES = {"fp32": onnx.TensorProto.FLOAT, "bf16": onnx.TensorProto.BFLOAT16}
MIN_OPSET, MAX_OPSET = 21, 23


def export(
    source: Source,
    out: Path,
    *,
    weights: WeightsKind,
    dtype: ExportDtype = "fp32",
    seed: int = 0,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    fp8: Fp8Mode = "keep",
) -> Manifest:
    """Write the export folder `out` and return its manifest (folder set). An FP8 checkpoint's weights
    stay FP8 (bytes and scales as they are) unless `fp8="dequantize"`."""
    _check_request(source, weights, dtype, opset)
    index = _checkpoint_index(source) if weights == "checkpoint" else None  # headers only
    if weights != "none":
        _check_parent(out)
        _check_disk(out, estimate_weight_bytes(source.config, TORCH_DTYPES[dtype], index, fp8), weights)
    with atomic_folder(out, force, inputs=[source.folder]) as tmp:
        tmp.chmod(0o777 & ~_umask())  # a temporary folder is private; the export is an ordinary one
        with progress.task("tracing graphs (on meta, no weights)"):
            traced = trace_graphs(source.config, TORCH_DTYPES[dtype], opset)
        declared = [w for g in traced for w in g.weights]
        plan = plan_fp8(index if fp8 == "keep" else None, declared)  # FP8 stays FP8, in its own block
        layout = layout_for(declared, plan)
        signatures: dict[str, Signature] = {}
        for g in progress.track(traced, "writing graphs"):
            proto = finish_graph(g, layout, plan)
            onnx.save(proto, tmp / f"{g.role}.onnx")
            signatures[g.role] = signature(proto)
        if weights == "none":
            (tmp / WEIGHTS_FILE).touch()  # an empty placeholder: see manifest.py
        else:
            tensors = _weight_source(source, index, weights, dtype, seed, keep_fp8=fp8 == "keep")
            missing = write_weights(tmp / WEIGHTS_FILE, layout, tensors, TORCH_DTYPES[dtype])
            if missing:
                raise CheckpointError(
                    f"the weights lack {len(missing)} tensors the graphs need, e.g. {', '.join(missing[:3])}"
                )
        roles: set[str] = {g.role for g in traced}
        manifest = _manifest(source, weights, dtype, seed, opset, roles, signatures, plan, fp8)
        write_manifest(manifest, tmp)
    manifest.folder = out
    return manifest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_request(source: Source, weights: WeightsKind, dtype: str, opset: int) -> None:
    if weights == "checkpoint" and not source.has_weights:
        what = f"preset '{source.name}'" if source.kind == "preset" else f"{source.name} (only config.json)"
        raise UserError(f"{what} has no weights; pass --weights random or --weights none")
    if dtype not in TORCH_DTYPES:
        raise UserError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"opset {opset} is not supported; choose {MIN_OPSET} to {MAX_OPSET}")


def estimate_weight_bytes(
    config: DeepseekV3Config, dtype: torch.dtype, index: CheckpointIndex | None = None, fp8: Fp8Mode = "keep"
) -> int:
    """Bytes of weights.bin before alignment: FP8 checkpoint tensors (and their scales) as stored, every
    other weight in `dtype` (the router bias stays float32)."""
    shapes = parameter_shapes(config)
    total = sum(math.prod(s) * (4 if n.endswith(BIAS_FP32) else dtype.itemsize) for n, s in shapes.items())
    if index is not None and fp8 == "keep":
        for ours, key in index.names.items():
            stored = index.tensors[key]
            if stored.dtype == "F8_E4M3" and ours in shapes:
                scale = index.tensors[key + SCALE_SUFFIX]
                total -= math.prod(stored.shape) * (dtype.itemsize - 1)
                total += math.prod(scale.shape) * 4
    return total


def _check_parent(out: Path) -> None:
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserError(f"{out}: parent folder {parent} does not exist")


def _check_disk(out: Path, needed: int, weights: WeightsKind) -> None:
    parent = out.resolve().parent
    free = shutil.disk_usage(parent).free
    if needed > free * 0.95:
        raise UserError(
            f"--weights {weights} needs {needed / 2**30:.1f} GiB for {WEIGHTS_FILE} but {parent} has "
            f"{free / 2**30:.1f} GiB free; free space, choose another --out, or use --weights none"
        )


def finish_graph(g: TracedGraph, layout: Layout, plan: Fp8Plan | None = None) -> onnx.ModelProto:
    """Bind the weights to external data (FP8 ones with their dequantization), attach the custom ops'
    functions, check the structure."""
    proto = g.proto
    proto.producer_name, proto.producer_version = PRODUCER, dsv3c.__version__
    proto.graph.initializer.extend(_float_declaration(layout, w) for w in g.weights)
    if plan is not None and plan.weights:
        proto = to_fp8_form(proto, plan, layout)
    attach_functions(proto)
    check_structure(proto)
    return proto


def _float_declaration(layout: Layout, w: onnx.ValueInfoProto) -> onnx.TensorProto:
    """The weight as traced (an FP8 slot is declared in the traced dtype until to_fp8_form replaces it)."""
    tensor = layout.external_proto(w.name)
    tensor.data_type = w.type.tensor_type.elem_type
    return tensor


def check_structure(proto: onnx.ModelProto) -> None:
    """onnx.checker (full_check: with shape inference) on everything but the external weights' bytes.

    The checker opens external data files relative to the working directory for an in-memory model, and
    a `--weights none` folder has none; so a copy is checked with external initializers as graph inputs.
    """
    register_schemas()
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    names = {t.name for t in external}
    kept = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external)
    onnx.checker.check_model(copy, full_check=True)


def signature(proto: onnx.ModelProto) -> Signature:
    def info(v: onnx.ValueInfoProto) -> TensorInfo:
        t = v.type.tensor_type
        dims: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return TensorInfo(v.name, _dtype_name(t.elem_type), dims)

    return Signature([info(v) for v in proto.graph.input], [info(v) for v in proto.graph.output])


def _dtype_name(elem_type: int) -> str:
    return (
        "bfloat16" if elem_type == onnx.TensorProto.BFLOAT16 else str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    )


def _checkpoint_index(source: Source) -> CheckpointIndex:
    assert source.folder is not None
    return read_index(source.folder, source.config)


def _weight_source(
    source: Source,
    index: CheckpointIndex | None,
    weights: WeightsKind,
    dtype: ExportDtype,
    seed: int,
    keep_fp8: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    if weights == "checkpoint":
        assert index is not None  # shard by shard; fp8 tensors as they are (then their scales) or dequantized
        return load_state_dict_streaming(index, keep_fp8=keep_fp8, dtype=TORCH_DTYPES[dtype])
    return random_state(source.config, seed)  # init_random's weights, one tensor at a time


def _manifest(
    source: Source,
    weights: WeightsKind,
    dtype: ExportDtype,
    seed: int,
    opset: int,
    roles: set[str],
    signatures: dict[str, Signature],
    plan: Fp8Plan,
    fp8: Fp8Mode,
) -> Manifest:
    config = source.config
    files = source.files(with_weights=weights == "checkpoint")
    stage = {
        "stage": "export",
        "source": source.name,
        **({"source_path": str(source.folder.resolve())} if source.folder is not None else {}),
        "source_kind": source.kind,
        "source_files": [f.name for f in files],
        "source_sha256": sha256_files(files, source.folder) if files else config_sha256(config),
        "config_sha256": config_sha256(config),
        "weights": weights,
        **({"seed": seed} if weights == "random" else {}),
        "dtype": dtype,
        **({"fp8_weights": len(plan.weights), "fp8_block": list(plan.block)} if plan.weights else {}),
        **({"fp8": "dequantized"} if fp8 == "dequantize" and source.kind == "checkpoint" else {}),
        "opset": opset,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
    }
    cache = CacheLayout(
        layers=config.num_hidden_layers,
        mtp_layers=len(mtp_roles(roles)),  # MTP graphs, each with its own one-layer cache
        ckv_width=config.kv_lora_rank,
        kpe_width=config.qk_rope_head_dim,
        dtype=_dtype_name(_ONNX_DTYPES[dtype]),
    )
    return Manifest(
        config=config.to_dict(),
        weights=weights,
        dtype=cache.dtype,
        opset=opset,
        graphs={role: (f"{role}.onnx" if role in roles else None) for role in (*ROLES, *mtp_roles(roles)[1:])},
        signatures=signatures,
        cache=cache,
        stages=[stage],
        weights_file=WEIGHTS_FILE,
        dsv3c_version=dsv3c.__version__,
    )
