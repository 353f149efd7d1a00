"""Optimization profiles: a (min, opt, max) range per symbolic dimension, defaults from the model config.

The export's signatures name their dynamic dimensions (batch, seq, q, past), so a profile is given per
dimension and applied to every input that has it (shapes of one graph stay consistent):

    --profile decode:past=0,256,4096     the past length of decode.onnx
    --profile batch=1,4,16               every graph's batch
    --profile decode:past_ckv.0=1x0x64,1x256x64,8x4096x64   one input by name (shapes, 'x'-separated)

Defaults: batch 1..8 (opt 1); prefill seq 1..max_tokens (opt 128); decode q 1..1+num_nextn_predict_layers
(MTP drafts verified in one step, opt 1); past 0..max_tokens (opt 256, one latent-buffer growth chunk; 0
is an empty cache); mtp seq 1..max_tokens (the whole prompt once, then 1 + nextn per step; opt 1 + nextn).
max_tokens = min(max_position_embeddings, 8192).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv3c.artifact.engine_manifest import ShapeRange
from dsv3c.artifact.manifest import Signature
from dsv3c.errors import UserError
from dsv3c.models.config import DeepseekV3Config

MAX_BATCH = 8
MAX_TOKENS = 8192  # a deployment default for the longest profile, not a model property
Range = tuple[int, int, int]


@dataclass
class ProfileSpec:
    """User overrides: by dimension name, and by input name (whole shapes), per role ('*' = every role)."""

    dims: dict[tuple[str, str], Range] = field(default_factory=dict)
    inputs: dict[tuple[str, str], tuple[list[int], list[int], list[int]]] = field(default_factory=dict)


def default_dims(config: DeepseekV3Config, role: str) -> dict[str, Range]:
    tokens = min(config.max_position_embeddings, MAX_TOKENS)
    q_max = 1 + max(config.num_nextn_predict_layers, 1)
    dims = {"batch": (1, 1, MAX_BATCH), "past": (0, min(256, tokens), tokens)}
    dims["seq"] = (1, min(128, tokens), tokens) if role == "prefill" else (1, q_max, tokens)
    dims["q"] = (1, 1, q_max)
    return dims


def parse_profile_args(items: list[str]) -> ProfileSpec:
    """Parse repeated `[role:]name=min,opt,max`; UserError naming the bad item."""
    spec = ProfileSpec()
    for item in items:
        head, eq, values = item.partition("=")
        role, colon, name = head.rpartition(":")
        role = role if colon else "*"
        parts = values.split(",")
        if not eq or not name or len(parts) != 3:
            raise UserError(f"--profile {item!r}: expected [role:]name=min,opt,max (e.g. decode:past=0,256,4096)")
        try:
            if "x" in values:
                shapes = [[int(d) for d in p.split("x")] for p in parts]
                spec.inputs[(role, name)] = (shapes[0], shapes[1], shapes[2])
                _check_order(item, shapes[0], shapes[1], shapes[2])
            else:
                lo, opt, hi = (int(p) for p in parts)
                spec.dims[(role, name)] = (lo, opt, hi)
                _check_order(item, [lo], [opt], [hi])
        except ValueError:
            raise UserError(f"--profile {item!r}: values must be integers (shapes as 1x256x64)") from None
    return spec


def _check_order(item: str, lo: list[int], opt: list[int], hi: list[int]) -> None:
    if not len(lo) == len(opt) == len(hi):
        raise UserError(f"--profile {item!r}: min, opt and max shapes have different ranks")
    if any(d < 0 for d in lo) or any(not a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
        raise UserError(f"--profile {item!r}: need 0 <= min <= opt <= max in every dimension")


def profile_for(role: str, signature: Signature, config: DeepseekV3Config, spec: ProfileSpec) -> dict[str, ShapeRange]:
    """One ShapeRange per input of the graph; UserError for an override naming nothing in it."""
    dims = default_dims(config, role)
    names = {d for t in signature.inputs for d in t.shape if isinstance(d, str)}
    inputs = {t.name: t for t in signature.inputs}
    for (r, name), dim_range in spec.dims.items():
        if r in ("*", role) and name in names:
            dims[name] = dim_range
        elif r == role and name not in inputs:
            raise UserError(
                f"--profile {role}:{name}: {role} has no dimension or input {name!r} "
                f"(dimensions: {', '.join(sorted(names))})"
            )
    out = {}
    for t in signature.inputs:
        per_dim = [dims.get(d, (0, 0, 0)) if isinstance(d, str) else (d, d, d) for d in t.shape]
        unknown = [d for d in t.shape if isinstance(d, str) and d not in dims]
        if unknown:
            raise UserError(f"{role} input {t.name} has dimension {unknown[0]!r} with no default; pass --profile")
        out[t.name] = ShapeRange([r[0] for r in per_dim], [r[1] for r in per_dim], [r[2] for r in per_dim])
    for (r, name), (lo, opt, hi) in spec.inputs.items():
        if r not in ("*", role):
            continue
        if name not in inputs:
            if r == role:
                raise UserError(f"--profile {role}:{name}: {role} has no input {name!r} (inputs: {', '.join(inputs)})")
            continue
        fixed = inputs[name].shape
        if len(lo) != len(fixed) or any(
            isinstance(d, int) and d not in (a, c) for d, a, c in zip(fixed, lo, hi, strict=True)
        ):
            raise UserError(f"--profile {role}:{name}: shape must match {fixed} (fixed sizes kept)")
        out[name] = ShapeRange(lo, opt, hi)
    return out


def check_names(spec: ProfileSpec, signatures: dict[str, Signature]) -> None:
    """An override for every role ('*') must name a dimension or input of at least one graph."""
    dims = {d for s in signatures.values() for t in s.inputs for d in t.shape if isinstance(d, str)}
    inputs = {t.name for s in signatures.values() for t in s.inputs}
    for role, name in [*spec.dims, *spec.inputs]:
        if role == "*" and name not in dims | inputs:
            raise UserError(
                f"--profile {name}: no graph has a dimension or input {name!r} (dimensions: {', '.join(sorted(dims))})"
            )
        if role != "*" and role not in signatures:
            raise UserError(f"--profile {role}:{name}: no {role} graph (graphs: {', '.join(signatures)})")


def dim_ranges(shapes: dict[str, list[int | str]], profile: dict[str, ShapeRange]) -> dict[str, Range]:
    """The profile by dimension name ({'batch': (1, 1, 8), ...}), given the inputs' symbolic shapes."""
    out: dict[str, Range] = {}
    for name, r in profile.items():
        for i, d in enumerate(shapes.get(name, [])):
            if isinstance(d, str) and i < len(r.min):
                out.setdefault(d, (r.min[i], r.opt[i], r.max[i]))
    return out
