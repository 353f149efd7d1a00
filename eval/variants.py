"""Every transformation of the fidelity table, made from one checkpoint with dsv3c's own commands.

Each variant is the folder a user gets from the command in `how`; building one that fails (a lowering a
runtime cannot load, IREE missing) records the reason instead of a number, so the table says what was not
measured and why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dsv3c.errors import UserError


@dataclass
class Variant:
    name: str
    how: str  # the dsv3c command that makes it
    folder: Path | None = None
    runtime: str = "ort"  # ort | iree
    error: str | None = None  # why it could not be built


@dataclass
class Plan:
    checkpoint: Path
    work: Path
    calibration: Sequence[np.ndarray] | None  # token windows for static calibration (None: random ids)
    calibrate_batches: int = 8
    iree_dims: dict[str, int] = dataclasses.field(default_factory=lambda: {"batch": 1, "seq": 128, "q": 1, "past": 16})


def _export(plan: Plan, out: Path, dtype: str = "fp32") -> None:
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder

    export(from_folder(plan.checkpoint), out, weights="checkpoint", dtype=dtype, force=True)  # type: ignore[arg-type,unused-ignore]


def _quantize(src: Path, out: Path, plan: Plan, weights: str, acts: str, pow2: bool = False) -> None:
    from dsv3c.passes.fp8_math import ActScheme, WeightScheme
    from dsv3c.passes.pipelines import QuantizeOptions
    from dsv3c.passes.quantize import quantize_folder

    options = QuantizeOptions(weights=WeightScheme(weights), activations=ActScheme(acts), pow2_scales=pow2)
    static = acts == "static"
    quantize_folder(
        src,
        out,
        options,
        calibrate=plan.calibrate_batches if static else 0,
        calibration_text=plan.calibration if static else None,
        force=True,
    )


def _lower(src: Path, out: Path, target: str, plan: Plan, weights_8bit: bool = False) -> None:
    from dsv3c.passes.lower import lower_folder
    from dsv3c.passes.pipelines import Target

    dims = plan.iree_dims if target == "iree" else None
    lower_folder(src, out, Target(target), dims=dims, force=True, weights_8bit=128 if weights_8bit else None)


Step = tuple[str, str, str | None, Callable[[Path, Path, Plan], None]]  # name, how, source folder, out, plan

STEPS: list[Step] = [
    ("canonical export", "export", None, lambda _s, o, p: _export(p, o)),
    (
        "bf16 export",
        "export --dtype bf16 (ort CPU: float32 math on bf16 weights)",
        None,
        lambda _s, o, p: _export(p, o, "bf16"),
    ),
    ("fp8 block (online 1x128)", "quantize", "canonical export", lambda s, o, p: _quantize(s, o, p, "block", "tile")),
    (
        "fp8 per-tensor",
        "quantize --weight-scheme tensor (per-tensor activations)",
        "canonical export",
        lambda s, o, p: _quantize(s, o, p, "tensor", "tensor"),
    ),
    (
        "fp8 static-calibrated",
        "quantize --calibrate 8 --calibration-data TEXT",
        "canonical export",
        lambda s, o, p: _quantize(s, o, p, "block", "static"),
    ),
    (
        "fp8 pow2 scales",
        "quantize --pow2-scales",
        "canonical export",
        lambda s, o, p: _quantize(s, o, p, "block", "tile", pow2=True),
    ),
    ("lower ort", "lower --target ort", "canonical export", lambda s, o, p: _lower(s, o, "ort", p)),
    (
        "lower ort --weights-8bit",
        "lower --target ort --weights-8bit",
        "canonical export",
        lambda s, o, p: _lower(s, o, "ort", p, True),
    ),
    (
        "fp8 block, lower ort",
        "quantize | lower --target ort",
        "fp8 block (online 1x128)",
        lambda s, o, p: _lower(s, o, "ort", p),
    ),
    (
        "lower trt",
        "quantize --calibrate | lower --target trt",
        "fp8 static-calibrated",
        lambda s, o, p: _lower(s, o, "trt", p),
    ),
    (
        "lower iree",
        "lower --target iree --shape batch=1,seq=W",
        "canonical export",
        lambda s, o, p: _lower(s, o, "iree", p),
    ),
]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def build_variants(plan: Plan, only: Sequence[str] | None = None, log: Callable[[str], None] = print) -> list[Variant]:
    """The variants in STEPS order (those in `only` and what they are made from), built under plan.work."""
    plan.work.mkdir(parents=True, exist_ok=True)
    made: dict[str, Variant] = {}
    wanted = set(only) if only else {s[0] for s in STEPS}
    needed = set(wanted)
    for name, _how, source, _build in reversed(STEPS):
        if name in needed and source:
            needed.add(source)
    for name, how, source, build in STEPS:
        if name not in needed:
            continue
        variant = Variant(name, how)
        src = made[source].folder if source else plan.checkpoint
        out = plan.work / slug(name)
        if src is None:
            variant.error = f"its source ({source}) could not be built"
        else:
            try:
                if not (out / "manifest.json").is_file():
                    log(f"building {name}: {how}")
                    build(src, out, plan)
                variant.folder = out
            except UserError as e:
                variant.error = str(e)
        made[name] = variant
    return [v for n, v in made.items() if n in wanted]
