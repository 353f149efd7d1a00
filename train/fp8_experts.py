"""A MoE layer's routed experts in FP8 as grouped GEMMs: one quantization per layer and projection.

With an Fp8Linear in every expert, each expert and projection calls the quantizers (5 compiled calls),
pads and the autograd machinery on its own; on the H200 that host work bounds bench-moe's FP8 step
(1.46 s of wall clock for 0.63 s of CUDA time), and it grows as balancing spreads tokens over more experts.
Here a layer's routed (token, slot) rows are laid out expert by expert, each expert's segment padded with
zero rows to a multiple of 128, so the 128x1 tiles of the weight-gradient GEMM never straddle two
experts. Activations and gradients are then quantized once for all experts, the weights once as
[E, N, K] 128x128 blocks, and only the GEMMs run per expert. Gate and up share one GEMM (their weights
side by side), as they share their input.

The quantization is the per-expert path's exactly (rows are tiled independently, segments start on a
tile, pad rows are zeros, and N is padded per expert as quantize_blocks pads it), so the forward GEMMs
multiply the same FP8 values. One difference: gate's and up's input gradients are summed inside one
float32 GEMM instead of as two rounded outputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from dsv3c.models.deepseek_v3 import MLP, MoE, sort_by_expert
from dsv3c.train import fp8_linear as fl
from dsv3c.train import fp8_quant as fq
from dsv3c.train.fp8_linear import Fp8Recipe


def _padded(n: int) -> int:
    return -(-n // fq.TILE) * fq.TILE


def _reduction_multiple(real: bool) -> int:
    """What a GEMM's reduction axis is padded to: 4 x 128 for cuBLAS's block scales (fp8_linear), else 128."""
    return fl.SCALE_ROW_BLOCKS * fq.TILE if real else fq.TILE


class _GroupedFp8Function(torch.autograd.Function):
    """x [Tp, K] (expert segments at `starts`, each a multiple of 128 rows) times each expert's
    weight [E, N, K]^T -> [Tp, N]; forward, input-gradient and weight-gradient GEMMs in FP8."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, starts: list[int], sizes: list[int], recipe: Fp8Recipe
    ) -> torch.Tensor:
        experts, n, _ = weight.shape
        real = fl.use_scaled_mm(recipe, x.device)
        red = _reduction_multiple(real)
        # every expert's 128x128 blocks in one call: [E * Np, Kr] rows never mix experts (Np % 128 == 0);
        # K is padded here, once, to what the real GEMM needs, so no per-expert call pads it again
        w = fq.pad_to(fq.pad_to(weight, fq.TILE, 1), red, 2)
        qw, sw = fl.quantizer("quantize_blocks", recipe, x.device)(w.reshape(experts * w.shape[1], -1), recipe.pow2)
        qw = qw.view(experts, w.shape[1], qw.shape[-1])
        sw = sw.view(experts, w.shape[1] // fq.TILE, sw.shape[-1])
        qx, sx = fl.quantizer("quantize_tiles", recipe, x.device)(fq.pad_to(x, red, 1), recipe.pow2)
        gemm = fl.scaled_mm_tile_block if real else fl.emulate_tile_block
        out = x.new_zeros((x.shape[0], n), dtype=torch.bfloat16 if real else x.dtype)
        for e, (start, size) in enumerate(zip(starts, sizes, strict=True)):
            rows = slice(start, start + size)
            out[rows] = gemm(qx[rows], sx[rows], qw[e], sw[e])[:, :n].to(out.dtype)
        ctx.save_for_backward(x, qw, sw)
        ctx.starts, ctx.sizes, ctx.recipe, ctx.weight_shape = starts, sizes, recipe, weight.shape
        ctx.weight_dtype = weight.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, qw, sw = ctx.saved_tensors
        recipe: Fp8Recipe = ctx.recipe
        _, n, k = ctx.weight_shape
        real = fl.use_scaled_mm(recipe, x.device)
        tiles = fl.quantizer("quantize_tiles", recipe, x.device)
        red = _reduction_multiple(real)
        grad = grad.contiguous()
        qg, sg = tiles(fq.pad_to(grad, red, 1), recipe.pow2)  # dgrad: 1x128 along N, N padded once
        # W^T's blocks for dgrad, all experts at once: [E, Kr, Nr] (N padded as dY's is)
        qwt = fq.pad_to(qw.transpose(1, 2), red, 2).contiguous()
        swt = F.pad(sw.transpose(1, 2), (0, qwt.shape[2] // fq.TILE - sw.shape[1]), value=1.0).contiguous()
        qgt, sgt = tiles(grad.t(), recipe.pow2)  # wgrad: 128x1 along the rows, i.e. 1x128 of the transposes
        qxt, sxt = tiles(x.t(), recipe.pow2)
        tile_block = fl.scaled_mm_tile_block if real else fl.emulate_tile_block
        tile_tile = fl.scaled_mm_tile_tile if real else fl.emulate_tile_tile
        dx = torch.zeros_like(x)
        dw = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=x.device)
        for e, (start, size) in enumerate(zip(ctx.starts, ctx.sizes, strict=True)):
            rows, blocks = slice(start, start + size), slice(start // fq.TILE, (start + size) // fq.TILE)
            dx[rows] = tile_block(qg[rows], sg[rows], qwt[e], swt[e])[:, :k].to(dx.dtype)
            a, sa = qgt[:, rows].contiguous(), sgt[:, blocks].contiguous()
            b, sb = qxt[:, rows].contiguous(), sxt[:, blocks].contiguous()
            dw[e] = tile_tile(a, sa, b, sb)[:n, :k].to(dw.dtype)
        return dx, dw, None, None, None


def grouped_fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, starts: list[int], sizes: list[int], recipe: Fp8Recipe
) -> torch.Tensor:
    """x [Tp, K] segment by segment times weight [E, N, K]^T -> [Tp, N], in autocast's dtype on CUDA."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        out_dtype = torch.get_autocast_dtype("cuda")
    else:
        out_dtype = x.dtype
    with torch.autocast(x.device.type, enabled=False):
        y = _GroupedFp8Function.apply(x, weight, starts, sizes, recipe)
    return y.to(out_dtype)


class Fp8GroupedMoE(MoE):
    """MoE whose routed experts run as grouped FP8 GEMMs (made from a MoE in place; weights unchanged)."""

    recipe: Fp8Recipe

    def routed(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        tokens, slots, on_device = sort_by_expert(indices, len(self.experts))  # as MoE.routed
        counts = on_device.tolist()
        # only the experts that got tokens take part, so an idle expert gets no gradient (None, not zeros)
        # and the optimizer leaves it alone, as with one Fp8Linear per expert
        active = [e for e, c in enumerate(counts) if c]
        sizes = [_padded(counts[e]) for e in active]
        starts = [sum(sizes[:i]) for i in range(len(active))]
        # the padded row of each sorted pair: its rank among all pairs, shifted by its expert's padding so far
        shift = torch.zeros(len(self.experts), dtype=torch.long)
        before = 0
        for i, e in enumerate(active):
            shift[e] = starts[i] - before
            before += counts[e]
        dest = torch.arange(len(tokens), device=flat.device) + shift.to(flat.device)[indices[tokens, slots]]
        x = flat.new_zeros((sum(sizes), flat.shape[1]))
        x[dest] = flat[tokens]
        experts: list[MLP] = [self.experts[e] for e in active]  # type: ignore[misc]
        inter = experts[0].gate_proj.weight.shape[0]
        pad = _padded(inter) - inter
        gate_up = torch.stack(
            [
                torch.cat([F.pad(e.gate_proj.weight, (0, 0, 0, pad)), F.pad(e.up_proj.weight, (0, 0, 0, pad))])
                for e in experts
            ]
        )  # [E, 2 Np, D]: gate's rows, then up's, each padded to a multiple of 128
        gu = grouped_fp8_linear(x, gate_up, starts, sizes, self.recipe)
        h = F.silu(gu[:, :inter]) * gu[:, inter + pad : 2 * inter + pad]
        down = torch.stack([e.down_proj.weight for e in experts])  # [E, D, N]
        y = grouped_fp8_linear(h, down, starts, sizes, self.recipe)
        out = torch.zeros_like(flat, dtype=torch.float32)
        out.index_add_(0, tokens, y[dest].float() * weights[tokens, slots, None])
        return out


def group_experts(model: torch.nn.Module, recipe: Fp8Recipe) -> int:
    """Turn every MoE (block granularity only) into Fp8GroupedMoE in place; returns how many."""
    if recipe.granularity != "block":
        return 0
    count = 0
    for module in model.modules():
        if type(module) is MoE:
            module.__class__ = Fp8GroupedMoE
            module.recipe = recipe  # type: ignore[assignment]
            count += 1
    return count
