"""FP8 activations: the input of every MatMul linear with an fp8 weight is quantized and dequantized.

Tile scheme (DeepSeek, online): per token, per 128 channels.

    x [..., K] -> Pad to Kp = 128 * C (zeros; only when K % 128) -> Reshape [..., C, 128]
      amax = ReduceMax(Abs) [..., C, 1];  s = max(amax, 1e-4) / 448  (optionally 2^ceil(log2 s))
      QuantizeLinear(x, s, axis=-1, block_size=128) -> FLOAT8E4M3FN -> DequantizeLinear(same s)
      -> Reshape [..., Kp] -> Slice [..., :K]

Tensor scheme: one online scale for the whole activation (for comparison). Static scheme: a calibrated
per-tensor scale, a constant named `{linear}.input_scale` (what TensorRT wants). Linears that read the
same activation share one Q/DQ. The attention core (kv_b_proj) and the MoE experts read their
activations inside their custom nodes; those stay high precision here (a lowering's kernel quantizes).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from dsv3c.artifact import provenance
from dsv3c.errors import UserError
from dsv3c.export.builder import Builder, first_user
from dsv3c.models.fp8 import FP8_MAX
from dsv3c.onnxkit.linears import LinearKind, WeightUse, rewritable_linears
from dsv3c.passes.fp8_math import AMAX_FLOOR, TILE, ActScheme, act_scale
from dsv3c.passes.fp8_weights import _require_opset
from dsv3c.passes.stages import DsPass, StageResult

FP8 = ir.DataType.FLOAT8E4M3FN


class Fp8ActivationsPass(DsPass):
    def __init__(
        self, scheme: ActScheme = ActScheme.TILE, pow2: bool = False, static_amax: dict[str, float] | None = None
    ) -> None:
        super().__init__()
        self.scheme, self.pow2, self.static_amax = scheme, pow2, static_amax or {}

    def requires(self, model: ir.Model) -> None:
        _require_opset(model, "fp8 activations")
        for linear in self._linears(model.graph):
            x = linear.activation
            assert x is not None
            if x.shape is None or not isinstance(x.shape[-1], int):
                raise ir.passes.PreconditionError(f"the input of {linear.name} has no static last dimension")
            if self.scheme == ActScheme.STATIC and linear.name not in self.static_amax:
                raise UserError(f"static activation scales: no calibration for {linear.name}; run with --calibrate N")

    def _linears(self, graph: ir.Graph) -> list[WeightUse]:
        return [lin for lin in rewritable_linears(graph) if lin.kind == LinearKind.MATMUL and lin.weight.dtype == FP8]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        groups: dict[ir.Value, list[WeightUse]] = {}
        for linear in self._linears(graph):
            assert linear.activation is not None
            groups.setdefault(linear.activation, []).append(linear)
        for x, linears in groups.items():
            b = Builder(
                linears[0].name.removesuffix(".weight") + "/input",
                rewrite=self._rewrite(),
                origin=[lin.user for lin in linears],
            )
            y = self._qdq(b, x, linears)
            b.insert_before(graph, first_user(graph, [lin.user for lin in linears]))
            for linear in linears:
                linear.user.replace_input_with(0, y)
        return StageResult(
            model, bool(groups), {"fp8_activations": len(groups), "scheme": self.scheme.value, "pow2": self.pow2}
        )

    def _rewrite(self) -> provenance.Rewrite:
        """What the diff reports: `quantized(fp8, 1x128 tiles (online))`, `quantized(fp8, per-tensor (static))`."""
        how = "static" if self.scheme == ActScheme.STATIC else "online"
        grain = f"1x{TILE} tiles" if self.scheme == ActScheme.TILE else "per-tensor"
        return provenance.quantized("fp8", f"{grain} ({how})")

    def _qdq(self, b: Builder, x: ir.Value, linears: list[WeightUse]) -> ir.Value:
        assert x.shape is not None and x.dtype is not None
        dtype = x.dtype
        h = x if dtype == ir.DataType.FLOAT else b.op("Cast", x, name="cast_in", to=ir.DataType.FLOAT)
        if self.scheme == ActScheme.STATIC:
            amax = max(self.static_amax[lin.name] for lin in linears)
            s = b.const(np.float32(act_scale(torch.tensor(amax), self.pow2).item()), name="scale")
            out = self._roundtrip(b, h, s, {})
        elif self.scheme == ActScheme.TENSOR:
            s = self._scale(b, b.op("ReduceMax", b.op("Abs", h), keepdims=0, name="amax"))
            out = self._roundtrip(b, h, s, {})
        else:
            channels = x.shape[-1]
            assert isinstance(channels, int)  # requires() checked it
            out = self._tiles(b, h, len(x.shape), channels)
        if dtype != ir.DataType.FLOAT:
            out = b.op("Cast", out, name="cast_out", to=dtype)
        return out

    def _tiles(self, b: Builder, h: ir.Value, rank: int, k: int) -> ir.Value:
        tiles = -(-k // TILE)
        pad = tiles * TILE - k
        if pad:
            h = b.op("Pad", h, b.ints(*([0] * (2 * rank - 1) + [pad]), name="pads"), name="pad")  # [..., Kp]
        t = b.op(
            "Reshape", h, b.ints(*([0] * (rank - 1) + [tiles, TILE]), name="tiles"), name="to_tiles"
        )  # [..., C, 128]
        amax = b.op("ReduceMax", b.op("Abs", t), b.ints(-1, name="axes"), keepdims=1, name="amax")  # [..., C, 1]
        q = self._roundtrip(b, t, self._scale(b, amax), {"axis": -1, "block_size": TILE})
        y = b.op("Reshape", q, b.ints(*([0] * (rank - 1) + [tiles * TILE]), name="channels"), name="from_tiles")
        if pad:
            start, end, axes = b.ints(0, name="start"), b.ints(k, name="end"), b.ints(-1, name="axes")
            y = b.op("Slice", y, start, end, axes, name="crop")  # [..., K]
        return y

    def _scale(self, b: Builder, amax: ir.Value) -> ir.Value:
        floor, fp8_max = b.const(np.float32(AMAX_FLOOR), name="floor"), b.const(np.float32(FP8_MAX), name="fp8_max")
        s = b.op("Div", b.op("Max", amax, floor), fp8_max, name="scale")
        if self.pow2:  # 2^ceil(log2 s)
            log2 = b.op("Div", b.op("Log", s), b.const(np.float32(math.log(2.0)), name="ln2"), name="log2")
            s = b.op("Pow", b.const(np.float32(2.0), name="two"), b.op("Ceil", log2), name="scale_pow2")
        return s

    def _roundtrip(self, b: Builder, h: ir.Value, s: ir.Value, axis: dict[str, Any]) -> ir.Value:
        q = b.op("QuantizeLinear", h, s, name="quantize", output_dtype=FP8, **axis)
        out: ir.Value = b.op("DequantizeLinear", q, s, name="dequantize", **axis)
        return out
