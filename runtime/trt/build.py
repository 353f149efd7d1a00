"""Build one TensorRT engine per graph of an export folder and record what was built (engine_manifest.json).

    manifest = build_engines(Path("exp"), Path("engines"), BuildOptions(precision="fp32"))

The pipeline per graph: prepare (prepare.py: lowering or inlining, checks) -> parse -> summarize the
network (layers.py) -> optimization profile (profiles.py) -> build -> read the header back. Output is
written into a temporary sibling folder and renamed into place, so a failed build leaves nothing behind.
Precision is the graph's (TensorRT-RTX networks are strongly typed): `--precision` checks it.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dsv3c
from dsv3c.artifact.atomic import atomic_file, atomic_folder
from dsv3c.artifact.engine_manifest import EngineManifest, EngineRecord, ShapeRange, TensorRecord, write_engine_manifest
from dsv3c.artifact.manifest import Manifest, Signature, read_manifest
from dsv3c.errors import UserError
from dsv3c.models.config import DeepseekV3Config
from dsv3c.runtime.trt.backend import (
    TensorRTModule,
    cc_enum,
    load_backend,
    make_logger,
    native_stderr,
    require_mxfp8,
)
from dsv3c.runtime.trt.header import read_header
from dsv3c.runtime.trt.layers import allow_attention_decomposition, summarize
from dsv3c.runtime.trt.prepare import Lowering, ParserInput, load_for_parser, lowered_folder, online_scale_node
from dsv3c.runtime.trt.profiles import ProfileSpec, check_names, profile_for

Precision = Literal["fp32", "bf16", "fp8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp8")
PRE_FP8_CC = ("7.5", "8.0", "8.6")
_NO_FUSED_ATTENTION = "Attention operation was not supported by a dedicated kernel"
_HINTS = {
    "HW-specific datatypes: fp8": "fp8 needs compute capability 8.9 or newer: drop 8.0/8.6 from --target-cc",
    "CHECK(is_constant())": "TensorRT needs build-time constant Q/DQ scales, and TensorRT-RTX 1.7 cannot pair "
    "block-scaled fp8 weights with fp8 activations; use per-channel weight scales for fp8 GEMMs, "
    "or leave the activations unquantized (weight-only fp8)",
}
_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "BOOL": "bool",
    "FP8": "float8_e4m3fn",
    "INT8": "int8",
    "UINT8": "uint8",
}


@dataclass
class BuildOptions:
    precision: Precision | None = None  # None: whatever the graphs hold
    profiles: ProfileSpec = field(default_factory=ProfileSpec)
    timing_cache: Path | None = None
    target_cc: list[str] = field(default_factory=list)  # empty: the backend's default set
    roles: list[str] | None = None  # None: every graph in the manifest
    lowering: Lowering = "auto"  # see prepare.lowered_folder
    # the passes' trt lowering, lower_for_trt(src, dst): dsv3c build gives dsv3c.passes' (runtime/ does not import it)
    # lower_for_trt(src, dst, mxfp8=True): online activation scales as TensorRT's dynamic MXFP8
    lower_for_trt: Callable[..., object] | None = None
    force: bool = False


def build_engines(
    export_dir: Path, out: Path, options: BuildOptions, log: Callable[[str], None] = print
) -> EngineManifest:
    backend = load_backend()
    log(f"backend: {backend.describe()}")
    source = read_manifest(export_dir)
    if source.weights == "none":
        raise UserError(f"{export_dir}: exported with --weights none; TensorRT needs the weights to build")
    if options.target_cc and not backend.is_rtx:
        raise UserError("--target-cc needs TensorRT-RTX; full TensorRT builds for the GPU it runs on")
    with tempfile.TemporaryDirectory(prefix="dsv3c-build-") as scratch:
        online = online_scale_node(source) if options.lowering != "inline" else None
        if online is not None:  # DeepSeek's online 1x128 tiles: TensorRT builds them only as MXFP8
            require_mxfp8(backend, options.target_cc, online)
        lowering = (options.lowering, options.lower_for_trt)
        folder, how = lowered_folder(Path(export_dir), Path(scratch), *lowering, mxfp8=online is not None)
        log(f"graphs: {how}")
        manifest = read_manifest(folder)
        roles = _roles(manifest, options.roles)
        graphs = {role: load_for_parser(manifest, role) for role in roles}
        for role, graph in graphs.items():  # lowered to MXFP8 before the build (dsv3c lower --activations)
            if graph.mxfp8:
                require_mxfp8(backend, options.target_cc, f"{role}.onnx: {graph.mxfp8[0].describe()}")
        precision = _precision(options, manifest, graphs)
        check_names(options.profiles, {r: manifest.signatures[r] for r in roles})
        cache = _read_cache(options.timing_cache)
        if options.timing_cache and backend.is_rtx:
            log("timing cache: not used, TensorRT-RTX has none (it compiles kernels at run time)")
        config = DeepseekV3Config.from_dict(manifest.config)
        engines = {}
        with atomic_folder(out, options.force, inputs=[export_dir]) as tmp:
            for role in roles:
                profile = profile_for(role, manifest.signatures[role], config, options.profiles)
                engines[role], cache = build_one(
                    backend, graphs[role], manifest.signatures[role], profile, options.target_cc, cache, tmp
                )
                log(_line(engines[role]))
            names = {"name": backend.name, "version": backend.version, "onnx_parser_version": backend.parser_version}
            result = EngineManifest(
                backend=names,
                precision=precision,
                target_cc=list(options.target_cc),
                source={"folder": str(Path(export_dir).resolve()), "preparation": how, "stages": manifest.stages},
                config=manifest.config,
                cache=_cache_layout(manifest),
                engines=engines,
                timing_cache=str(options.timing_cache) if options.timing_cache and not backend.is_rtx else None,
                dsv3c_version=dsv3c.__version__,
            )
            write_engine_manifest(result, tmp)
        if options.timing_cache and cache and not backend.is_rtx:
            with atomic_file(options.timing_cache) as t:
                t.write_bytes(cache)
    return result


def build_one(
    backend: TensorRTModule,
    graph: ParserInput,
    signature: Signature,
    profile: dict[str, ShapeRange],
    target_cc: list[str],
    cache: bytes,
    out_dir: Path,
) -> tuple[EngineRecord, bytes]:
    """Parse, summarize and build one graph into out_dir/{role}.engine; UserError naming the ONNX node."""
    trt = backend.trt
    logger = make_logger(backend)
    builder = trt.Builder(logger)
    flags = 0 if backend.is_rtx else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph.model_bytes, str(graph.path)):
        raise _parse_error(parser, graph)
    summary = summarize(backend, network)
    config = _config(backend, builder, network, profile, target_cc, graph, logger)
    if not backend.is_rtx:  # TensorRT-RTX: timing cache operations are no-ops (deprecated since 1.2)
        config.set_timing_cache(config.create_timing_cache(cache), False)
    start, printed = time.perf_counter(), list[str]()
    with native_stderr(printed):  # Myelin prints "Internal Error: ..." past the logger
        serialized = builder.build_serialized_network(network, config)
        if serialized is None and any(_NO_FUSED_ATTENTION in e for e in logger.errors):
            summary.attention_decomposable = allow_attention_decomposition(backend, network) > 0
            logger.errors.clear()
            serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise _build_error(logger.errors or printed, graph)
    path = out_dir / f"{graph.role}.engine"
    data = bytes(serialized)
    path.write_bytes(data)
    symbolic = {t.name: t.shape for t in [*signature.inputs, *signature.outputs]}
    inputs = [_tensor(network.get_input(i), symbolic) for i in range(network.num_inputs)]
    outputs = [_tensor(network.get_output(i), symbolic) for i in range(network.num_outputs)]
    record = EngineRecord(
        role=graph.role,
        file=path.name,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        build_seconds=round(seconds, 3),
        inputs=inputs,
        outputs=outputs,
        profiles=[profile],
        layers=summary,
        engine_cc=read_header(path).cc,
    )
    return record, cache if backend.is_rtx else bytes(config.get_timing_cache().serialize())


def _config(
    backend: TensorRTModule,
    builder: Any,
    network: Any,
    profile: dict[str, ShapeRange],
    target_cc: list[str],
    graph: ParserInput,
    logger: Any,
) -> Any:
    config = builder.create_builder_config()
    if target_cc:
        config.num_compute_capabilities = len(target_cc)
        for i, cc in enumerate(target_cc):
            config.set_compute_capability(cc_enum(backend, cc), i)
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(profile):
        raise UserError(
            f"{graph.path.name}: the graph's inputs {sorted(names)} differ from its manifest signature "
            f"{sorted(profile)}; re-export the folder"
        )
    p = builder.create_optimization_profile()
    for name, r in profile.items():
        p.set_shape(name, r.min, r.opt, r.max)
    if config.add_optimization_profile(p) < 0:
        raise UserError(f"{graph.path.name}: TensorRT rejected the optimization profile: {logger.first_error()}")
    return config


def _parse_error(parser: Any, graph: ParserInput) -> UserError:
    e = parser.get_error(0)
    index = e.node()
    node = graph.nodes[index].describe() if 0 <= index < len(graph.nodes) else "the graph"
    lines = [ln.strip() for ln in e.desc().splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Invalid Node", "[checkMacros", "In node"))] or lines
    more = f" ({parser.num_errors - 1} more)" if parser.num_errors > 1 else ""
    return UserError(f"{graph.path.name}: TensorRT cannot parse {node}: {' '.join(useful[0].split())[:300]}{more}")


def _build_error(errors: list[str], graph: ParserInput) -> UserError:
    text = " ".join(" ".join(errors).split()) or "no message from TensorRT"
    named = sorted((n for n in graph.nodes if len(n.name) > 3 and n.name in text), key=lambda n: -len(n.name))
    where = f" at {named[0].describe()}" if named else ""
    if not named and "is_constant" in text and graph.blocked_dq:
        where = f" (first block-scaled dequantization: {graph.blocked_dq[0].describe()})"
    hint = next((f"; {h}" for key, h in _HINTS.items() if key in text), "")
    return UserError(f"{graph.path.name}: TensorRT build failed{where}: {text[:300]}{hint}")


def _tensor(t: Any, symbolic: dict[str, list[int | str]]) -> TensorRecord:
    """The network tensor with its -1 dimensions named as in the export's signature."""
    dtype = _DTYPES.get(str(t.dtype).rsplit(".", 1)[-1], str(t.dtype))
    names = symbolic.get(t.name, [])
    shape: list[int | str] = [names[i] if d == -1 and i < len(names) else int(d) for i, d in enumerate(t.shape)]
    return TensorRecord(t.name, dtype, shape)


def _roles(manifest: Manifest, wanted: list[str] | None) -> list[str]:
    present = [r for r, f in manifest.graphs.items() if f]
    for role in wanted or []:
        if role not in present:
            raise UserError(f"--roles: no {role} graph in this export (it has {', '.join(present)})")
    return [r for r in present if wanted is None or r in wanted]


def _precision(options: BuildOptions, manifest: Manifest, graphs: dict[str, ParserInput]) -> Precision:
    found: Precision = (
        "fp8" if any(g.has_fp8 for g in graphs.values()) else ("bf16" if manifest.dtype == "bfloat16" else "fp32")
    )
    wanted = options.precision or found
    if wanted != found:
        how = {
            "fp8": "run `dsv3c quantize` on the export first",
            "bf16": "export with `dsv3c export --dtype bf16`",
            "fp32": "export with --dtype fp32 and do not quantize",
        }[wanted]
        raise UserError(
            f"--precision {wanted}: this export's graphs are {found} (TensorRT-RTX networks are strongly "
            f"typed: the graph's types are the precision); {how}"
        )
    if wanted == "fp8" and set(options.target_cc) & set(PRE_FP8_CC):
        raise UserError(
            f"--precision fp8 needs compute capability 8.9 or newer; drop {', '.join(PRE_FP8_CC)} from --target-cc"
        )
    return wanted


def _read_cache(path: Path | None) -> bytes:
    if path is None or not path.exists():
        return b""
    if not path.is_file():
        raise UserError(f"--timing-cache {path}: not a file")
    return path.read_bytes()


def _cache_layout(manifest: Manifest) -> dict[str, Any]:
    c = manifest.cache
    return {
        "layers": c.layers,
        "mtp_layers": c.mtp_layers,
        "ckv_width": c.ckv_width,
        "kpe_width": c.kpe_width,
        "dtype": c.dtype,
    }


def _line(r: EngineRecord) -> str:
    s = r.layers
    fp8 = f", fp8 layers {len(s.fp8)} (fp8 GEMMs {len(s.fp8_gemms)}, weight-only {len(s.fp8_weight_gemms)})"
    native = f"native attention {len(s.attention)}, rotary {len(s.rotary)}, moe {len(s.moe)}"
    return (
        f"{r.role}: built in {r.build_seconds:.2f} s, {r.bytes / 2**20:.1f} MiB, {s.total} layers, {native}"
        f"{fp8 if s.fp8 else ''}"
    )
