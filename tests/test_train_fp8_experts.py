"""Grouped FP8 experts (train/fp8_experts.py) against one Fp8Linear per expert, on the CPU emulation.

Both quantize the same values the same way, so the forward products agree to float32 summation order;
gate's and up's input gradients are summed in one GEMM instead of two, hence the looser input tolerance.
"""

import copy

import pytest
import torch
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import MoE
from dsv3c.train.fp8_experts import Fp8GroupedMoE, group_experts
from dsv3c.train.fp8_linear import Fp8Recipe, convert_to_fp8

from .fixtures.cublas_scaled_mm import cublas_scaled_mm


def _moe(hidden: int, inter: int, experts: int, seed: int = 0) -> MoE:
    config = DeepseekV3Config.from_preset("tiny").replace(
        hidden_size=hidden,
        moe_intermediate_size=inter,
        n_routed_experts=experts,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        n_shared_experts=0,
    )
    torch.manual_seed(seed)
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return moe


def _run(moe: MoE, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    flat = flat.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    out = moe.routed(flat, weights, indices)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, flat.grad, weights.grad


@pytest.mark.parametrize("hidden, inter", [(256, 128), (200, 96)])
@pytest.mark.parametrize("pow2", [False, True])
def test_grouped_experts_compute_what_one_fp8_linear_per_expert_computes(hidden, inter, pow2):
    recipe = Fp8Recipe(pow2=pow2, backend="emulate")
    reference = _moe(hidden, inter, experts=6)
    convert_to_fp8(reference, recipe)
    grouped = copy.deepcopy(reference)
    assert group_experts(grouped, recipe) == 1 and isinstance(grouped, Fp8GroupedMoE)
    tokens = 300
    g = torch.Generator().manual_seed(1)
    flat = torch.randn(tokens, hidden, generator=g)
    weights = torch.rand(tokens, 2, generator=g)
    # expert 5 gets no token: it must get no gradient on either path
    indices = torch.stack([torch.randint(0, 5, (tokens,), generator=g), torch.randint(0, 5, (tokens,), generator=g)], 1)
    indices[indices[:, 0] == indices[:, 1], 1] = (indices[indices[:, 0] == indices[:, 1], 0] + 1) % 5
    out_r, dflat_r, dw_r = _run(reference, flat, weights, indices)
    out_g, dflat_g, dw_g = _run(grouped, flat, weights, indices)
    torch.testing.assert_close(out_g, out_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw_g, dw_r, rtol=1e-5, atol=1e-6)
    # gate + up summed in one float32 GEMM vs two: same FP8 products, another summation order
    torch.testing.assert_close(dflat_g, dflat_r, rtol=1e-4, atol=1e-6)
    for (name, p_r), p_g in zip(reference.named_parameters(), grouped.parameters(), strict=True):
        if p_r.grad is None:
            assert p_g.grad is None, name
            continue
        torch.testing.assert_close(p_g.grad, p_r.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert reference.experts[5].gate_proj.weight.grad is None


def test_grouped_experts_differ_from_float_by_fp8_rounding_only():
    """The grouped path is FP8 (not a float fallback): off float by FP8's error, well within 10%."""
    float_moe = _moe(256, 128, experts=4)
    grouped = copy.deepcopy(float_moe)
    recipe = Fp8Recipe(backend="emulate")
    convert_to_fp8(grouped, recipe)
    group_experts(grouped, recipe)
    g = torch.Generator().manual_seed(2)
    flat = torch.randn(64, 256, generator=g)
    weights = torch.rand(64, 2, generator=g)
    indices = torch.stack([torch.zeros(64, dtype=torch.long), torch.randint(1, 4, (64,), generator=g)], 1)
    exact = float_moe.routed(flat, weights, indices)
    fp8 = grouped.routed(flat, weights, indices)
    rel = ((fp8 - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < 0.1, rel


def test_an_fp8_model_trains_with_grouped_experts():
    """build_model groups the experts of an FP8 model; a few steps on one batch lower its loss."""
    from dsv3c.train.config import TrainConfig, model_config
    from dsv3c.train.loop import build_model, losses, make_optimizer

    train = TrainConfig(precision="fp8", device="cpu", batch_size=1, seq_len=32, seed=0, lr=3e-3)
    config = model_config("tiny", None)
    model = build_model(config, train, torch.device("cpu")).train()
    grouped = [m for m in model.modules() if isinstance(m, Fp8GroupedMoE)]
    assert grouped and len(grouped) == sum(isinstance(m, MoE) for m in model.modules())
    window = torch.randint(config.vocab_size, (1, 32 + 1 + len(model.mtp)), generator=torch.Generator().manual_seed(0))
    opt = make_optimizer(model, train)
    first = last = None
    for _ in range(5):
        main, mtp = losses(model, window, 32)
        loss = main + 0.3 * sum(mtp)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(main.detach()) if first is None else first
        last = float(main.detach())
    assert last < first - 0.2, (first, last)


@pytest.mark.parametrize("hidden, inter", [(256, 128), (384, 96)])
def test_the_grouped_cuda_gemm_calls_meet_cublas_block_layouts(monkeypatch, hidden, inter):
    """The grouped path's real-FP8 calls (forward, dgrad, wgrad per expert) through a _scaled_mm that
    refuses what cuBLAS would misread, against the emulation: K/128 of 1, 2 and 3 occur here."""
    from dsv3c.train import fp8_linear as fl

    monkeypatch.setattr(torch, "_scaled_mm", cublas_scaled_mm)
    monkeypatch.setattr(fl, "_TILE_TILE_LAYOUT", [])
    monkeypatch.setattr(fl, "use_scaled_mm", lambda recipe, device: recipe.backend != "emulate")
    results = []
    for backend in ("scaled_mm", "emulate"):
        recipe = Fp8Recipe(backend=backend, compile=False)
        moe = _moe(hidden, inter, experts=4)
        convert_to_fp8(moe, recipe)
        group_experts(moe, recipe)
        g = torch.Generator().manual_seed(3)
        flat, weights = torch.randn(150, hidden, generator=g), torch.rand(150, 2, generator=g)
        indices = torch.stack([torch.zeros(150, dtype=torch.long), torch.randint(1, 4, (150,), generator=g)], 1)
        results.append((*_run(moe, flat, weights, indices), moe.experts[0].down_proj.weight.grad))
    for real, emulated in zip(*results, strict=True):
        rel = ((real.float() - emulated).norm() / emulated.norm()).item()
        assert rel < 2e-2, rel  # the real path rounds its GEMM outputs to bf16
    assert fl._TILE_TILE_LAYOUT[0][0] != "emulated"
