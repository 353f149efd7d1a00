"""An FP8 linear layer for training: forward, input-gradient and weight-gradient GEMMs from E4M3 inputs.

DeepSeek-V3's recipe (§3.3): in Y = X W^T the activation X is scaled per 1x128 tile along K and W per
128x128 block; in the backward pass dX = dY W uses dY per 1x128 tile along N with the same W blocks
(transposed), and dW = dY^T X uses dY and X per 128x1 tile (along the token axis M, the reduction axis
of that GEMM). Every GEMM accumulates in float32. The master weight, its gradient and the optimizer
state stay float32; the output is bf16 under CUDA autocast, else the input's dtype.

Two backends compute the same quantized product: `emulate` dequantizes and multiplies in float32 (CPU,
tests; fp8 x fp8 products are exact in float32, so only the summation order differs from hardware),
`scaled_mm` runs real FP8 GEMMs through torch._scaled_mm (CUDA, sm89+), with the scale layouts cuBLAS
accepts for block scaling: activation scales [M, K/128] in column-major strides, weight scales the
transpose of a row-major [N/128, K/128] tensor whose K/128 is a multiple of 4 (K zero-padded to one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from dsv3c.train import fp8_quant as fq
from torch import nn

Granularity = Literal["block", "tensor"]
Backend = Literal["auto", "emulate", "scaled_mm"]
# the linears DeepSeek-V3 runs in FP8: attention projections and every FFN (dense, shared, routed);
# kv_b_proj is read as a matrix by the attention core itself, so it stays in higher precision
FP8_LINEARS = frozenset(
    {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj", "gate_proj", "up_proj", "down_proj"}
)


@dataclass(frozen=True)
class Fp8Recipe:
    granularity: Granularity = "block"  # 1x128 tiles and 128x128 blocks, or one scale per tensor
    pow2: bool = False  # round every scale up to a power of two
    backend: Backend = "auto"  # scaled_mm on a CUDA device that has FP8 GEMMs, else emulate
    compile: bool = True  # fuse the quantizers on CUDA (eager quantization costs more than the GEMM)
    triton: bool = True  # fuse them as Triton kernels where triton is installed (else torch.compile)


# ---- the quantized GEMMs -------------------------------------------------------------------------


def use_scaled_mm(recipe: Fp8Recipe, device: torch.device) -> bool:
    if recipe.backend == "emulate" or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


_COMPILED: dict[tuple[str, torch.dtype, bool], Any] = {}
_ROW_MULTIPLE = 16  # cuBLAS's FP8 GEMMs want rows in multiples of 16
_RECOMPILE_LIMIT = 32


def quantizer(name: str, recipe: Fp8Recipe, device: torch.device) -> Any:
    """The quantizer: on CUDA a Triton kernel (train/fp8_triton.py), else compiled (one fused kernel
    instead of ~6; eager if compiling fails).

    Dynamo compiles a new variant for each input form it has not seen, and past its limit (8 per
    function by default) the quantizer silently runs eagerly, as it did on the H200 for bench-moe's
    expert slices (the step time barely changed once fixed: the step is bound by host work elsewhere,
    bench/train_step_profile.py). So the kernel sees few forms: detached and contiguous, rows padded to a multiple
    of 16 (an expert's slice has any count, 1 included, which dynamo specializes on) and K to a multiple
    of 128 (no padding branch inside), both sizes marked dynamic from the first call. What still varies
    (the dtype: bf16 or float32 activations; K = 128, one tile, or more) gives a handful of variants, and
    the limit is raised for these calls alone so none falls back. Zero rows and columns quantize to
    zeros, so the rows kept are unchanged.
    """
    fn = getattr(fq, name)
    if device.type != "cuda" or not recipe.compile:
        return fn
    if recipe.triton and not _TRITON_FAILED:
        from dsv3c.train import fp8_triton

        if fp8_triton.available():
            return _with_fallback(getattr(fp8_triton, name), name, recipe, device)
    rows = fq.TILE if name == "quantize_blocks" else _ROW_MULTIPLE

    def guarded(x: torch.Tensor, pow2: bool) -> Any:
        m = x.shape[0]
        x = fq.pad_to(fq.pad_to(x.detach(), rows, 0), fq.TILE, 1).contiguous()
        torch._dynamo.maybe_mark_dynamic(x, 0)
        torch._dynamo.maybe_mark_dynamic(x, 1)
        key = (name, x.dtype, pow2)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(fn, dynamic=True)
        try:
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                q, scale = _COMPILED[key](x, pow2)
        except Exception as e:  # a broken inductor toolchain must not stop training
            import warnings

            warnings.warn(f"torch.compile of {name} failed ({type(e).__name__}); quantizing eagerly", stacklevel=2)
            _COMPILED[key] = fn
            q, scale = fn(x, pow2)
        # quantize_blocks pads its rows itself (to 128); a tile's rows are kept at the caller's count
        return (q, scale) if name == "quantize_blocks" else (q[:m], scale[:m])

    return guarded


_TRITON_FAILED: list[str] = []  # set once a Triton kernel failed to build or run: the compiled path from then on


def _with_fallback(kernel: Any, name: str, recipe: Fp8Recipe, device: torch.device) -> Any:
    def run(x: torch.Tensor, pow2: bool) -> Any:
        if not _TRITON_FAILED:
            try:
                return kernel(x, pow2)
            except Exception as e:  # a broken triton install must not stop training
                import warnings

                warnings.warn(f"Triton {name} failed ({type(e).__name__}: {e}); using torch.compile", stacklevel=2)
                _TRITON_FAILED.append(name)
        return quantizer(name, recipe, device)(x, pow2)

    return run


def _pad_rows(x: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    return fq.pad_to(x, multiple, 0)


# cuBLAS reads a 128x128 block-scale matrix with its K/128 axis rounded up to a multiple of 4 (16-byte rows).
# torch 2.11 does not check this and passes K/128 as is, so any K/128 not divisible by 4 (hidden 384: 3; an
# expert's 256: 2) gives silently wrong products (newer torch checks the padded stride instead). Zero-padding
# K to a multiple of 4 x 128 satisfies both: the padded tiles hold zeros, so the product is unchanged.
SCALE_ROW_BLOCKS = 4


def _pad_reduction(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Pad K (a, b: [*, K]; sa: [M, K/128]; sb: [N/128, K/128]) so K/128 is a multiple of 4; scales pad with 1."""
    extra = -sa.shape[1] % SCALE_ROW_BLOCKS
    if not extra:
        return a, sa, b, sb
    a, b = fq.pad_to(a, SCALE_ROW_BLOCKS * fq.TILE, 1), fq.pad_to(b, SCALE_ROW_BLOCKS * fq.TILE, 1)
    sa = torch.nn.functional.pad(sa, (0, extra), value=1.0)
    sb = torch.nn.functional.pad(sb, (0, extra), value=1.0)
    return a, sa, b, sb


def scaled_mm_tile_block(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """a fp8 [M, K] per 1x128 (sa [M, K/128]) times b fp8 [N, K] per 128x128 (sb [N/128, K/128])^T -> [M, N] bf16."""
    m = a.shape[0]
    a, sa, b, sb = _pad_reduction(a, sa, b, sb)
    a, sa = _pad_rows(a), _pad_rows(sa)
    out = torch._scaled_mm(
        a, b.t(), scale_a=sa.t().contiguous().t(), scale_b=sb.t(), out_dtype=torch.bfloat16
    )  # [Mp, N]
    return out[:m]


# cuBLAS layouts tried for 1x128 x 1x128 (the weight-gradient GEMM); the first that works is kept. The
# output is bf16, like the other GEMMs' (float32 was suspected for the NaN runs on the H200 before the
# 128x128 scale rows above were found; it has not been tried again)
_TILE_TILE_LAYOUT: list[tuple[str, torch.dtype]] = []


def scaled_mm_tile_tile(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """a fp8 [M, K] per 1x128 times b fp8 [N, K] per 1x128 (along K), transposed -> [M, N] bf16."""
    m = a.shape[0]
    a, sa = _pad_rows(a), _pad_rows(sa)
    b, sb = _pad_rows(b), _pad_rows(sb)
    scale_a = sa.t().contiguous().t()
    # cuBLAS wants scale_b as [K/128, N] ("outer-dim-major"); which strides that means is tried once
    layouts = {"kn-rowmajor": lambda: sb.t().contiguous(), "kn-colmajor": lambda: sb.t()}
    order = _TILE_TILE_LAYOUT or [(n, torch.bfloat16) for n in layouts]
    for name, dtype in order:
        if name == "emulated":
            break
        try:
            out = torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=layouts[name](), out_dtype=dtype)
        except RuntimeError:
            continue
        if not _TILE_TILE_LAYOUT:
            _TILE_TILE_LAYOUT.append((name, dtype))
        return out[:m]
    # no layout accepted: the same quantized product, dequantized (recorded, so a benchmark says so)
    if not _TILE_TILE_LAYOUT:
        _TILE_TILE_LAYOUT.append(("emulated", torch.float32))
    return emulate_tile_tile(a, sa, b, sb)[:m]


def emulate_tile_block(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    return fq.dequantize_tiles(a, sa) @ fq.dequantize_blocks(b, sb).t()


def emulate_tile_tile(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    return fq.dequantize_tiles(a, sa) @ fq.dequantize_tiles(b, sb).t()


def _tensor_gemm(a: torch.Tensor, b: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T with one scale per operand."""
    qa, sa = fq.quantize_tensor(a, recipe.pow2)
    qb, sb = fq.quantize_tensor(b, recipe.pow2)
    if use_scaled_mm(recipe, a.device):
        m = qa.shape[0]
        qa = _pad_rows(qa)
        return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)[:m]
    return (qa.float() * sa) @ (qb.float() * sb).t()


def fp8_matmul(x: torch.Tensor, w: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
    """The forward GEMM alone: x [M, K] @ w [N, K]^T, both quantized as `recipe` says."""
    if recipe.granularity == "tensor":
        return _tensor_gemm(x, w, recipe)
    real = use_scaled_mm(recipe, x.device)
    qx, sx = quantizer("quantize_tiles", recipe, x.device)(x, recipe.pow2)
    qw, sw = quantizer("quantize_blocks", recipe, x.device)(w, recipe.pow2)
    y = (scaled_mm_tile_block if real else emulate_tile_block)(qx, sx, qw, sw)
    return y[:, : w.shape[0]]


class _Fp8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
        ctx.recipe = recipe
        if recipe.granularity == "tensor":
            ctx.save_for_backward(x, weight)
            return _tensor_gemm(x, weight, recipe)
        # the weight's 128x128 blocks serve the input-gradient GEMM too (transposed): quantize them once
        qw, sw = quantizer("quantize_blocks", recipe, x.device)(weight, recipe.pow2)
        ctx.save_for_backward(x, qw, sw)
        ctx.weight_shape = weight.shape
        ctx.weight_dtype = weight.dtype
        qx, sx = quantizer("quantize_tiles", recipe, x.device)(x, recipe.pow2)
        y = (scaled_mm_tile_block if use_scaled_mm(recipe, x.device) else emulate_tile_block)(qx, sx, qw, sw)
        return y[:, : weight.shape[0]]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        recipe: Fp8Recipe = ctx.recipe
        grad = grad.contiguous()
        if recipe.granularity == "tensor":
            x, weight = ctx.saved_tensors
            dx = _tensor_gemm(grad, weight.t(), recipe)  # [M, N] @ [N, K]
            dw = _tensor_gemm(grad.t(), x.t(), recipe)  # [N, M] @ [M, K]
            return dx.to(x.dtype), dw.to(weight.dtype), None
        x, qw, sw = ctx.saved_tensors  # qw [Np, Kp], sw: the forward's weight blocks
        real = use_scaled_mm(recipe, x.device)
        tiles = quantizer("quantize_tiles", recipe, x.device)
        n, k = ctx.weight_shape
        # dgrad: dY per 1x128 along N times W^T per 128x128 block (the blocks of W, transposed)
        qg, sg = tiles(grad, recipe.pow2)  # [M, Np]
        qwt, swt = qw.t().contiguous(), sw.t().contiguous()  # [Kp, Np], [Kp/128, Np/128]
        dx = (scaled_mm_tile_block if real else emulate_tile_block)(qg, sg, qwt, swt)[:, :k]
        # wgrad: dY^T and X^T per 1x128 along M, i.e. dY and X per 128x1 tile
        qgt, sgt = tiles(grad.t(), recipe.pow2)  # [N, Mp]
        qxt, sxt = tiles(x.t(), recipe.pow2)  # [K, Mp]
        dw = (scaled_mm_tile_tile if real else emulate_tile_tile)(qgt, sgt, qxt, sxt)[:n, :k]
        return dx.to(x.dtype), dw.to(ctx.weight_dtype), None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T through the FP8 GEMMs, differentiable in x and weight."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        out_dtype = torch.get_autocast_dtype("cuda")
    else:
        out_dtype = x.dtype
    with torch.autocast(x.device.type, enabled=False):
        y = _Fp8LinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, recipe)
    return y.to(out_dtype).view(*x.shape[:-1], weight.shape[0])


class Fp8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in FP8; made from an existing Linear in place, so names and weights stay."""

    recipe: Fp8Recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.recipe)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def convert_to_fp8(model: nn.Module, recipe: Fp8Recipe) -> list[str]:
    """Turn the model's FP8_LINEARS into Fp8Linear in place; returns their names."""
    converted = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in FP8_LINEARS:
            module.__class__ = Fp8Linear
            module.recipe = recipe  # type: ignore[assignment]
            converted.append(name)
    return converted
