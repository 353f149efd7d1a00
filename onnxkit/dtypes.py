"""The one dtype table: onnx_ir's `ir.DataType` (names, sizes, numpy types via ml_dtypes), as text and sizes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def _data_type(elem_type: int | None) -> ir.DataType | None:
    try:
        data_type = ir.DataType(elem_type if elem_type is not None else 0)
    except ValueError:
        return None
    return None if data_type in (ir.DataType.UNDEFINED, ir.DataType.STRING) else data_type


def dtype_name(elem_type: int | None) -> str:
    """`float`, `bfloat16`, `float8e4m3fn`, ... (the TensorProto name, lower-case)."""
    try:
        return ir.DataType(elem_type if elem_type is not None else 0).name.lower()
    except ValueError:
        return f"type{elem_type}"


def element_bytes(elem_type: int) -> float:
    """Bytes per element (0.5 for 4-bit types); 0 for strings and unknown types."""
    data_type = _data_type(elem_type)
    return float(data_type.itemsize) if data_type is not None else 0.0


def numpy_dtype(elem_type: int) -> np.dtype | None:
    """The numpy dtype data of this type reads as (ml_dtypes for bfloat16 and fp8); None for sub-byte types."""
    data_type = _data_type(elem_type)
    if data_type is None or data_type.itemsize < 1:
        return None
    return np.dtype(data_type.numpy())
