"""The compiled quantizers (what CUDA runs) stay few variants and equal the eager ones.

An expert's slice can have any row count and activations come in bf16 and float32: each new input form
recompiles, and past dynamo's limit the quantizer silently ran eagerly (a 3x slower FP8 step on the H200).
Inductor compiles for the CPU too, so the compiled path is checked here on CPU tensors.
"""

import random

import pytest
import torch
from dsv3c.train import fp8_linear, fp8_quant

pytest.importorskip("torch._inductor")


def test_the_compiled_quantizers_stay_few_variants_and_equal_eager(monkeypatch):
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    monkeypatch.setattr(fp8_linear, "_COMPILED", {})
    recipe = fp8_linear.Fp8Recipe(triton=False)  # the compiled path, also where triton is installed
    cuda = torch.device("cuda")  # only its type is read: it selects the compiled path
    tiles = fp8_linear.quantizer("quantize_tiles", recipe, cuda)
    blocks = fp8_linear.quantizer("quantize_blocks", recipe, cuda)
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    rng = random.Random(0)
    for _ in range(40):
        m, k = rng.choice([1, 2, 15, 17, 128, 129, 300]), rng.choice([100, 128, 384, 2048])
        dtype = rng.choice([torch.float32, torch.bfloat16])
        x = torch.randn(m, k, dtype=dtype) if rng.random() < 0.7 else torch.randn(k, m, dtype=dtype).t()
        q, s = tiles(x, False)
        q0, s0 = fp8_quant.quantize_tiles(x, False)
        assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0)
        w = torch.randn(rng.choice([100, 128, 256]), k)
        qb, sb = blocks(w, False)
        qb0, sb0 = fp8_quant.quantize_blocks(w, False)
        assert torch.equal(qb.view(torch.uint8), qb0.view(torch.uint8)) and torch.equal(sb, sb0)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"] - before
    # dtype (2) x one tile or more along K (2), per quantizer: 8 measured; dynamo's default limit is 8 each
    assert graphs <= 8, graphs
    assert all(f is not getattr(fp8_quant, n) for (n, *_), f in fp8_linear._COMPILED.items()), "fell back to eager"
