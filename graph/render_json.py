"""Any result dataclass as JSON (properties such as `share` and `identical` included)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

# computed properties worth having in JSON, by class name
_PROPERTIES = {
    "Fp8Coverage": ("share", "weight_only_share"),
    "GraphDiff": ("differences",),
    "DiffReport": ("identical",),
    "Rewrite": ("weight_only",),
}


def to_data(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for name in _PROPERTIES.get(type(value).__name__, ()):
            data[name] = to_data(getattr(value, name))
        return data
    if isinstance(value, dict):
        return {str(k): to_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_data(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan
    return value


def render_json(value: Any) -> str:
    return json.dumps(to_data(value), indent=1) + "\n"
