"""Auxiliary-loss-free balancing: bias updates even out expert load; gating weights still mix outputs."""

from __future__ import annotations

import torch
from dsv3c.models.balancing import expert_counts, update_correction_bias
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import Router


def skewed_router(config: DeepseekV3Config) -> Router:
    torch.manual_seed(0)
    router = Router(config)
    with torch.no_grad():
        router.weight.normal_(0, 0.05)
        router.weight[:2] += 0.3  # experts 0 and 1 attract most tokens
        router.e_score_correction_bias.zero_()
    return router


def load_imbalance(router: Router, x: torch.Tensor) -> float:
    _, indices = router(x)
    counts = expert_counts(indices, router.weight.shape[0]).float()
    return float(counts.max() / counts.mean())


def test_bias_updates_drive_load_toward_balance(tiny_config: DeepseekV3Config) -> None:
    config = tiny_config.replace(n_group=1, topk_group=1)
    router = skewed_router(config)
    x = torch.randn(4096, config.hidden_size) + 1.0  # shared offset: the skewed rows win for most tokens
    before = load_imbalance(router, x)
    for _ in range(300):
        _, indices = router(x)
        counts = expert_counts(indices, 8)
        router.e_score_correction_bias.data = update_correction_bias(router.e_score_correction_bias, counts, 3e-3)
    after = load_imbalance(router, x)
    assert before > 2.0
    assert after < 1.25 < before


def test_weights_mix_with_unbiased_scores_after_balancing(tiny_config: DeepseekV3Config) -> None:
    config = tiny_config.replace(n_group=1, topk_group=1)
    router = skewed_router(config)
    router.e_score_correction_bias.data = torch.linspace(-0.2, 0.2, 8)
    x = torch.randn(64, config.hidden_size)
    weights, indices = router(x)
    scores = torch.sigmoid(x @ router.weight.T)
    picked = scores.gather(1, indices)
    torch.testing.assert_close(weights, picked / picked.sum(-1, keepdim=True) * config.routed_scaling_factor)


def test_update_direction() -> None:
    bias = torch.zeros(4)
    new = update_correction_bias(bias, torch.tensor([10, 0, 5, 5]), gamma=0.01)
    torch.testing.assert_close(new, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
