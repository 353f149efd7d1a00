"""An FP8 checkpoint's weights stay FP8 in its export: which slots, their layout, the graphs, the bytes.

A weight the checkpoint stores as E4M3 with `weight_scale_inv` becomes an FP8 initializer (its bytes
unchanged) and a float32 scale initializer of the checkpoint's own block ([R, C], or [E, R, C] for the
stacked routed experts), dequantized in the graph in the form of export/fp8_form.py, which `dsv3c quantize`
writes too and keeps. Float weights are written in the export's dtype. The weights are written as they
stream from the checkpoint, one tensor at a time, into their slots (an expert at its index of the stacked
slot), so memory holds about one tensor whatever the checkpoint's size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import torch
from dsv3c import progress
from dsv3c.artifact.weights import Layout, WeightsWriter, plan_layout
from dsv3c.errors import CheckpointError
from dsv3c.export.fp8_form import FP8, SCALE_SUFFIX, Block, block_scale_dims, dequantize_weight
from dsv3c.models.checkpoint import CheckpointIndex

_EXPERTS = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FP8 = "F8_E4M3"


@dataclass
class Fp8Plan:
    """The export weights (slot names) that hold FP8 bytes, with the checkpoint's block."""

    block: Block
    weights: dict[str, tuple[int, ...]] = field(default_factory=dict)  # slot name -> fp8 shape

    def scale_name(self, name: str) -> str:
        return name + SCALE_SUFFIX


def _stored_dtype(index: CheckpointIndex, ours: str) -> str | None:
    key = index.names.get(ours) or index.names.get(index.copies.get(ours, ""))
    return index.tensors[key].dtype if key is not None else None


def plan_fp8(index: CheckpointIndex | None, weights: Iterable[onnx.ValueInfoProto]) -> Fp8Plan:
    """Which declared weights the checkpoint holds in FP8 (a stacked expert slot: every expert, or none)."""
    plan = Fp8Plan(index.block if index is not None else (128, 128))
    if index is None:
        return plan
    for value in weights:
        shape = tuple(int(d.dim_value) for d in value.type.tensor_type.shape.dim)
        m = _EXPERTS.match(value.name)
        if m and len(shape) == 3:
            parts = [f"{m['prefix']}.{e}.{m['proj']}.weight" for e in range(shape[0])]
        else:
            parts = [value.name]
        dtypes = {_stored_dtype(index, p) for p in parts}
        if _FP8 not in dtypes:
            continue
        if len(dtypes) > 1:
            raise CheckpointError(
                f"{index.folder}: the experts of {value.name} mix {' and '.join(sorted(map(str, dtypes)))}; "
                "a stacked expert weight must be FP8 for every expert or for none"
            )
        plan.weights[value.name] = shape
    return plan


def layout_for(weights: Iterable[onnx.ValueInfoProto], plan: Fp8Plan) -> Layout:
    """One slot per weight in first-use order; an FP8 weight's scales right after it."""

    def entries() -> Iterator[tuple[str, int, tuple[int, ...]]]:
        for value in weights:
            t = value.type.tensor_type
            shape = tuple(int(d.dim_value) for d in t.shape.dim)
            if value.name in plan.weights:
                yield value.name, int(FP8), shape
                yield plan.scale_name(value.name), int(ir.DataType.FLOAT), block_scale_dims(shape, plan.block)
            else:
                yield value.name, t.elem_type, shape

    return plan_layout(entries())


def to_fp8_form(proto: onnx.ModelProto, plan: Fp8Plan, layout: Layout) -> onnx.ModelProto:
    """The graph with each planned weight as fp8 + scales (external data of `layout`) and its dequantization."""
    names = [t.name for t in proto.graph.initializer if t.name in plan.weights]
    if not names:
        return proto
    model = ir.from_proto(proto)
    for name in names:
        dequantize_weight(
            model.graph,
            name,
            layout.external_tensor(name, ""),
            layout.external_tensor(plan.scale_name(name), ""),
            plan.block,
        )
    return ir.to_proto(model)


def slot_of(name: str) -> tuple[str, int | None]:
    """A model tensor name (or its `_scale_inv`) -> (slot name, expert index in a stacked slot, or None)."""
    base, suffix = (name.removesuffix(SCALE_SUFFIX), SCALE_SUFFIX) if name.endswith(SCALE_SUFFIX) else (name, "")
    m = _EXPERT.match(base)
    if m is None:
        return name, None
    return f"{m['prefix']}.{m['proj']}.weight{suffix}", int(m["e"])


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as numpy without conversion (fp8 as raw uint8, bf16 as ml_dtypes)."""
    t = tensor.detach().contiguous()
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def write_weights(
    path: Path, layout: Layout, tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> list[str]:
    """Write every tensor the layout has a slot for (fp8 as they are, floats in `dtype`, scales float32);
    returns the slots left unwritten."""
    with WeightsWriter(path, layout) as writer, progress.task("writing weights", layout.total, unit="bytes") as bar:
        for name, tensor in tensors:
            slot_name, index = slot_of(name)
            slot = layout.slots.get(slot_name)
            if slot is None:
                continue  # a tensor the graphs do not use
            if slot.dtype == FP8:
                if tensor.dtype != torch.float8_e4m3fn:
                    raise CheckpointError(f"tensor {name} is {tensor.dtype}, but its slot holds FP8 bytes")
            elif slot_name.endswith(SCALE_SUFFIX) and slot.dtype == ir.DataType.FLOAT:
                tensor = tensor.float()
            else:
                tensor = tensor.to(_TORCH[slot.dtype])
            data = _array(tensor)
            writer.write(slot_name, data, index)
            bar.update(description=f"writing {name}")
            bar.advance(data.nbytes)
        return writer.missing()


_TORCH = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.FLOAT16: torch.float16,
}
