"""The sizes of a graph value's declared shape once a session fixes its symbolic dimensions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from onnx import TensorShapeProto


def known_sizes(dims: Iterable[TensorShapeProto.Dimension], fixed: Mapping[str, int]) -> list[int] | None:
    """Each of `dims`' sizes (a symbolic one given its size in `fixed`), or None if one stays unknown."""
    sizes = []
    for dim in dims:
        if dim.HasField("dim_value"):
            sizes.append(int(dim.dim_value))
        elif dim.HasField("dim_param") and dim.dim_param in fixed:
            sizes.append(int(fixed[dim.dim_param]))
        else:
            return None
    return sizes
