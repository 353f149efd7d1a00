"""The Triton quantizers (what CUDA runs) equal fp8_quant's torch ops bit for bit; power-of-two scales are
the power of two at or above amax / 448, exactly.

The Triton half needs a CUDA GPU with triton (skipped here on the CPU). Triton's CPU interpreter is no
substitute: its float8 conversion rounds differently from the hardware's.
"""

import importlib.util
import math

import pytest
import torch
from dsv3c.train import fp8_quant as fq


def test_power_of_two_scales_are_the_power_at_or_above_the_scale() -> None:
    # just above a power of two, float32 log2 rounds to the integer and exp2(ceil(log2 s)) gives s's
    # lower power: these are the cases that formula got wrong
    powers = [2.0**e for e in range(-40, 20)]
    values = [p * f for p in powers for f in (1.0, 1 + 2**-23, 1 + 2**-20, 1.5, 2 - 2**-22)]
    amax = torch.tensor(values, dtype=torch.float32) * fq.FP8_MAX
    scale = fq._scale(amax, pow2=True)
    exact = amax.double() / fq.FP8_MAX  # the float32 scale the pow2 rounding starts from
    plain = fq._scale(amax, pow2=False).double()
    expected = torch.tensor([2.0 ** math.ceil(math.log2(s)) for s in plain.tolist()], dtype=torch.float64)
    assert torch.equal(scale.double(), expected)
    assert (scale.double() >= plain).all() and (scale.double() < 2 * plain).all()
    assert torch.allclose(plain, exact, rtol=1e-7)


needs_triton_gpu = pytest.mark.skipif(
    not torch.cuda.is_available()
    or torch.cuda.get_device_capability() < (8, 9)
    or importlib.util.find_spec("triton") is None,
    reason="needs an FP8 GPU with triton",
)


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for m, k in [(1, 7), (5, 100), (33, 256), (130, 300), (257, 2048)]:
        spread = torch.logspace(-6, 3, k, device="cuda")  # subnormal fp8 values in every tile, and large ones
        x = torch.randn(m, k, device="cuda", generator=g) * spread
        x[0, : min(k, 128)] = 0  # an all-zero tile
        out += [x, x.bfloat16(), x.t().contiguous().t(), x.bfloat16().t().contiguous().t()]
    return out


@needs_triton_gpu
@pytest.mark.parametrize("pow2", [False, True])
def test_triton_quantizers_equal_the_torch_ops(pow2: bool) -> None:
    from dsv3c.train import fp8_triton

    for x in _inputs():
        for name in ("quantize_tiles", "quantize_blocks"):
            q, s = getattr(fp8_triton, name)(x, pow2)
            # against the CPU emulation: torch on CUDA divides by a scalar as a product with its reciprocal
            # (scales 1 ulp off IEEE division, which flips bf16 inputs' values sitting on an E4M3 midpoint)
            q0, s0 = (t.cuda() for t in getattr(fq, name)(x.cpu(), pow2))
            assert q.shape == q0.shape and s.shape == s0.shape, (name, x.shape)
            assert torch.equal(s, s0), (name, x.shape, x.dtype, x.stride())
            assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)), (name, x.shape, x.dtype, x.stride())


@needs_triton_gpu
def test_cuda_quantizer_is_triton_by_default() -> None:
    from dsv3c.train import fp8_linear, fp8_triton

    x = torch.randn(40, 300, device="cuda")
    calls = []
    real = fp8_triton.quantize_tiles

    def spy(x, pow2):  # type: ignore[no-untyped-def]
        calls.append(x.shape)
        return real(x, pow2)

    cuda = torch.device("cuda")
    fp8_triton.quantize_tiles = spy
    try:
        q, _ = fp8_linear.quantizer("quantize_tiles", fp8_linear.Fp8Recipe(), cuda)(x, False)
        fp8_linear.quantizer("quantize_tiles", fp8_linear.Fp8Recipe(triton=False), cuda)(x, False)
    finally:
        fp8_triton.quantize_tiles = real
    assert calls == [x.shape] and not fp8_linear._TRITON_FAILED
    assert torch.equal(q.view(torch.uint8), fq.quantize_tiles(x)[0].view(torch.uint8))
