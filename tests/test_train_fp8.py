"""The FP8 training linear: quantizers against a plain reference, GEMMs and gradients against float."""

from __future__ import annotations

import pytest
import torch
from dsv3c.models.fp8 import dequantize_block_fp8
from dsv3c.train import fp8_quant as fq
from dsv3c.train.fp8_linear import Fp8Linear, Fp8Recipe, convert_to_fp8, fp8_linear, fp8_matmul

from .fixtures.cublas_scaled_mm import cublas_scaled_mm


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _reference_tiles(x: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize row by row, tile by tile, the way the recipe is written down."""
    rows, cols = x.shape
    padded_cols = -(-cols // 128) * 128
    q = torch.zeros(rows, padded_cols, dtype=torch.float8_e4m3fn)
    scales = torch.zeros(rows, padded_cols // 128)
    for r in range(rows):
        for t in range(padded_cols // 128):
            tile = x[r, t * 128 : (t + 1) * 128].float()
            scale = max(float(tile.abs().max()), 1e-12) / 448.0
            if pow2:
                scale = 2.0 ** torch.ceil(torch.log2(torch.tensor(scale))).item()
            scales[r, t] = scale
            q[r, t * 128 : t * 128 + tile.numel()] = (tile / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scales


@pytest.mark.parametrize("pow2", [False, True])
def test_tile_quantization_matches_the_plain_reference(pow2: bool) -> None:
    x = torch.randn(5, 300) * torch.logspace(-3, 2, 300)  # ragged last tile, wide dynamic range
    q, s = fq.quantize_tiles(x, pow2)
    q_ref, s_ref = _reference_tiles(x, pow2)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    if pow2:
        assert torch.equal(s, torch.exp2(torch.round(torch.log2(s))))


def test_block_quantization_dequantizes_like_the_checkpoint_format() -> None:
    w = torch.randn(200, 300) * 0.02
    q, s = fq.quantize_blocks(w)
    assert s.shape == (2, 3) and q.shape == (256, 384)
    # models/fp8.py reads DeepSeek's checkpoint blocks; both must agree on what the bytes mean
    assert torch.equal(fq.dequantize_blocks(q, s)[:200, :300], dequantize_block_fp8(q[:200, :300], s))
    assert _rel(fq.dequantize_blocks(q, s)[:200, :300], w) < 0.05


@pytest.mark.parametrize("granularity", ["block", "tensor"])
def test_fp8_gemm_is_the_product_of_the_quantized_operands(granularity: str) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(64, 256), torch.randn(384, 256) * 0.05
    recipe = Fp8Recipe(granularity=granularity, backend="emulate")  # type: ignore[arg-type]
    y = fp8_matmul(x, w, recipe)
    if granularity == "block":
        expected = fq.dequantize_tiles(*fq.quantize_tiles(x)) @ fq.dequantize_blocks(*fq.quantize_blocks(w)).t()
    else:
        (qx, sx), (qw, sw) = fq.quantize_tensor(x), fq.quantize_tensor(w)
        expected = (qx.float() * sx) @ (qw.float() * sw).t()
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5)
    # E4M3 keeps 3 mantissa bits: ~3% rms error per operand element, so a GEMM output within 6% of float
    assert _rel(y, x @ w.t()) < 0.06


def test_block_scaling_survives_outliers_that_per_tensor_scaling_does_not() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(128, 512), torch.randn(256, 512) * 0.05
    x[0, 0] = 1e5  # one outlier: per-tensor scaling flushes the small values of every other row
    exact = x @ w.t()
    block = _rel(fp8_matmul(x, w, Fp8Recipe(backend="emulate"))[1:], exact[1:])
    tensor = _rel(fp8_matmul(x, w, Fp8Recipe(granularity="tensor", backend="emulate"))[1:], exact[1:])
    assert block < 0.06 < tensor


@pytest.mark.parametrize("granularity", ["block", "tensor"])
def test_gradients_agree_with_float_within_fp8_tolerance(granularity: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 100, 256, requires_grad=True)
    w = (torch.randn(384, 256) * 0.05).requires_grad_()
    target = torch.randn(3, 100, 384)
    recipe = Fp8Recipe(granularity=granularity, backend="emulate")  # type: ignore[arg-type]
    (fp8_linear(x, w, recipe) * target).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()  # type: ignore[union-attr]
    x.grad, w.grad = None, None
    ((x @ w.t()) * target).sum().backward()
    # dgrad and wgrad each quantize both operands: the same 6% bound as the forward GEMM
    assert _rel(gx, x.grad) < 0.06  # type: ignore[arg-type]
    assert _rel(gw, w.grad) < 0.06  # type: ignore[arg-type]


def test_weight_gradient_uses_tiles_along_the_token_axis() -> None:
    """dW = dY^T X reduces over tokens: tiles of 128 tokens, so a loud token spoils only its own tile."""
    torch.manual_seed(0)
    x = torch.randn(256, 128, requires_grad=True)
    w = (torch.randn(128, 128) * 0.05).requires_grad_()
    grad = torch.randn(256, 128)
    grad[0] *= 1000.0  # a token with a huge gradient, in the first tile of 128 tokens
    fp8_linear(x, w, Fp8Recipe(backend="emulate")).backward(grad)
    gw = w.grad.clone()  # type: ignore[union-attr]
    exact_second_tile = grad[128:].t() @ x[128:].detach()
    w.grad = None
    x2 = x.detach()[128:].clone().requires_grad_()
    fp8_linear(x2, w, Fp8Recipe(backend="emulate")).backward(grad[128:])
    # the second tile of tokens contributes the same to dW whether or not the loud token is in the batch
    first_tile = gw - w.grad  # type: ignore[operator]
    assert _rel(w.grad, exact_second_tile) < 0.06  # type: ignore[arg-type]
    assert _rel(first_tile, grad[:128].t() @ x[:128].detach()) < 0.06


def test_convert_swaps_the_recipe_linears_only(tiny_config) -> None:  # type: ignore[no-untyped-def]
    from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(tiny_config)
    names = set(convert_to_fp8(model, Fp8Recipe(backend="emulate")))
    assert "model.layers.0.self_attn.q_a_proj" in names and "model.layers.1.mlp.experts.0.down_proj" in names
    assert "model.layers.1.mlp.shared_experts.gate_proj" in names and "mtp.0.block.self_attn.o_proj" in names
    assert not any(n.endswith(("kv_b_proj", "lm_head", "eh_proj", "head")) for n in names)
    assert isinstance(model.model.layers[0].mlp.up_proj, Fp8Linear)
    assert model.state_dict().keys() == DeepseekV3ForCausalLM(tiny_config).state_dict().keys()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 GPU"
)
@pytest.mark.parametrize("m,k,n", [(512, 1024, 768), (37, 384, 320), (200, 256, 1024)])
def test_scaled_mm_agrees_with_the_emulation(m: int, k: int, n: int) -> None:
    """On the GPU: real FP8 GEMMs, ragged and with K/128 not a multiple of 4 (the shapes that trained NaN)."""
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda") * 0.05
    real = fp8_matmul(x, w, Fp8Recipe(backend="scaled_mm", compile=False)).float()
    emulated = fp8_matmul(x, w, Fp8Recipe(backend="emulate")).float()
    assert _rel(real, emulated) < 5e-3  # bf16 output rounding
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    fp8_linear(xg, wg, Fp8Recipe(backend="scaled_mm", compile=False)).float().pow(2).sum().backward()
    xe = x.clone().requires_grad_()
    we = w.clone().requires_grad_()
    fp8_linear(xe, we, Fp8Recipe(backend="emulate")).pow(2).sum().backward()
    assert _rel(xg.grad, xe.grad) < 2e-2 and _rel(wg.grad, we.grad) < 2e-2  # type: ignore[arg-type]


# ---- the CUDA path's GEMM calls, against cuBLAS's block-scaling contract (runs without a GPU) ----------


@pytest.mark.parametrize("m,k,n", [(37, 384, 320), (200, 256, 1024), (16, 1024, 768), (5, 128, 256)])
def test_the_cuda_gemm_calls_meet_cublas_block_layouts(monkeypatch, m: int, k: int, n: int) -> None:  # type: ignore[no-untyped-def]
    """K/128 = 3 (hidden 384) or 2 (an expert's 256) once gave NaN training on the H200: cuBLAS reads 128x128
    scales in rows of 4, torch 2.11 passed rows of 3. Forward, dgrad and wgrad on ragged shapes must equal the
    emulation, through a _scaled_mm that refuses layouts cuBLAS would misread."""
    from dsv3c.train import fp8_linear as fl

    monkeypatch.setattr(torch, "_scaled_mm", cublas_scaled_mm)
    monkeypatch.setattr(fl, "_TILE_TILE_LAYOUT", [])
    monkeypatch.setattr(fl, "use_scaled_mm", lambda recipe, device: recipe.backend != "emulate")
    torch.manual_seed(0)
    x, w = torch.randn(m, k), torch.randn(n, k) * 0.05
    real = Fp8Recipe(backend="scaled_mm", compile=False)
    assert _rel(fp8_matmul(x, w, real), fp8_matmul(x, w, Fp8Recipe(backend="emulate"))) < 5e-3  # bf16 output
    grads = []
    for recipe in (real, Fp8Recipe(backend="emulate")):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        fp8_linear(xg, wg, recipe).float().pow(2).sum().backward()
        grads.append((xg.grad, wg.grad))
    assert _rel(grads[0][0], grads[1][0]) < 2e-2 and _rel(grads[0][1], grads[1][1]) < 2e-2  # type: ignore[arg-type]
    assert fl._TILE_TILE_LAYOUT[0][0] != "emulated"
