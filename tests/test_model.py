"""The reference model against itself: naive vs absorbed MLA, cached decode vs full recompute, routing."""

from __future__ import annotations

import pytest
import torch
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM, LayerCache, Router, route

from .conftest import random_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
@pytest.mark.parametrize("q_lora_rank", [None, 96])
def test_naive_and_absorbed_attention_agree(tiny_config: DeepseekV3Config, q_lora_rank: int | None) -> None:
    model = random_model(tiny_config.replace(q_lora_rank=q_lora_rank))
    ids = torch.randint(0, tiny_config.vocab_size, (3, 13))
    assert rel(model(ids, path="absorbed").logits, model(ids, path="naive").logits) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("path", ["naive", "absorbed"])
def test_cached_decode_matches_full_recompute(tiny_model: DeepseekV3ForCausalLM, path: str) -> None:
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 12))
    full = tiny_model(ids).logits
    prefix = tiny_model(ids[:, :7])
    past = prefix.new_cache
    for t in range(7, 12):  # one token at a time, growing the cache
        step = tiny_model(ids[:, t : t + 1], past=past, path=path)  # type: ignore[arg-type]
        assert rel(step.logits[:, 0], full[:, t]) < 1e-5
        past = [
            LayerCache(torch.cat([p.ckv, n.ckv], 1), torch.cat([p.kpe, n.kpe], 1))
            for p, n in zip(past, step.new_cache, strict=True)
        ]


@torch.no_grad()
def test_multi_token_decode_over_rows_of_different_lengths(tiny_model: DeepseekV3ForCausalLM) -> None:
    """Rows hold 3 and 6 valid cache entries (the rest is garbage); 2 new tokens each, as MTP verifies."""
    a, b = torch.randint(0, 512, (1, 8)), torch.randint(0, 512, (1, 8))
    expected_a, expected_b = tiny_model(a[:, :5]).logits[0, 3:5], tiny_model(b).logits[0, 6:8]
    prefill = tiny_model(torch.cat([torch.cat([a[:, :3], b[:, 3:6]], 1), b[:, :6]]))  # row 0 padded with junk
    lengths = torch.tensor([3, 6])
    new_ids = torch.cat([a[:, 3:5], b[:, 6:8]])
    out = tiny_model(new_ids, past=prefill.new_cache, past_lengths=lengths, path="absorbed")
    assert rel(out.logits[0], expected_a) < 1e-5
    assert rel(out.logits[1], expected_b) < 1e-5


def make_router(config: DeepseekV3Config) -> Router:
    return Router(config)


def zero_masked_route(scores: torch.Tensor, bias: torch.Tensor, r: Router) -> torch.Tensor:
    """transformers <= 5.2x's variant: dropped groups masked with 0.0 instead of -inf. Indices only."""
    choice = (scores + bias).unflatten(-1, (r.n_group, -1))
    keep = choice.topk(2, dim=-1).values.sum(-1).topk(r.topk_group, dim=-1).indices
    kept = torch.zeros(choice.shape[:2], dtype=torch.bool).scatter(1, keep, True)
    return choice.masked_fill(~kept[..., None], 0.0).flatten(1).topk(r.top_k, dim=-1).indices


def test_dropped_groups_are_masked_with_minus_infinity(tiny_config: DeepseekV3Config) -> None:
    """With negative biased scores a 0.0 mask would pick experts from dropped groups; DeepSeek never does."""
    router = make_router(tiny_config)  # 8 experts, 4 groups of 2, keep 2 groups, top-2
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.2, 0.1, 0.3, 0.05]])
    bias = torch.tensor([0.0, 0.0, -0.75, -0.75, -0.6, -0.6, -0.8, -0.8])
    # biased: [0.9, 0.8, -0.05, -0.15, -0.4, -0.5, -0.5, -0.75]; groups kept: 0 and 1
    _, indices = route(scores, bias, router)
    assert sorted(indices[0].tolist()) == [0, 1]
    router.top_k = 3  # the third pick must come from group 1 (-0.05), not a dropped group's 0.0
    _, indices = route(scores, bias, router)
    assert sorted(indices[0].tolist()) == [0, 1, 2]
    assert set(zero_masked_route(scores, bias, router)[0].tolist()) != {0, 1, 2}


def test_bias_selects_but_weights_come_from_unbiased_scores(tiny_config: DeepseekV3Config) -> None:
    router = make_router(tiny_config.replace(n_group=1, topk_group=1))
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]])
    bias = torch.zeros(8)
    bias[6:] = 1.0  # pushes experts 6 and 7 into the top-2
    weights, indices = route(scores, bias, router)
    assert sorted(indices[0].tolist()) == [6, 7]
    picked = scores[0, indices[0]]
    torch.testing.assert_close(weights[0], picked / picked.sum() * tiny_config.routed_scaling_factor)


def test_norm_topk_prob_false_keeps_raw_scores(tiny_config: DeepseekV3Config) -> None:
    router = make_router(tiny_config.replace(norm_topk_prob=False, n_group=1, topk_group=1))
    scores = torch.rand(5, 8)
    weights, indices = route(scores, torch.zeros(8), router)
    torch.testing.assert_close(weights, scores.gather(1, indices) * tiny_config.routed_scaling_factor)


@torch.no_grad()
def test_softmax_greedy_routing_of_v2_lite_shape(tiny_config: DeepseekV3Config) -> None:
    config = tiny_config.replace(
        scoring_func="softmax",
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        q_lora_rank=None,
    )
    model = random_model(config)
    assert model.model.layers[1].mlp.gate.e_score_correction_bias is None
    ids = torch.randint(0, 512, (2, 6))
    assert rel(model(ids, path="absorbed").logits, model(ids).logits) < 1e-5


@torch.no_grad()
def test_mtp_predicts_from_hidden_state_and_next_token(tiny_model: DeepseekV3ForCausalLM) -> None:
    ids = torch.randint(0, 512, (2, 9))
    main = tiny_model(ids[:, :-1])
    logits, hidden, new = tiny_model.forward_mtp(ids[:, 1:], main.hidden_states)
    assert logits.shape == (2, 8, 512) and hidden.shape == (2, 8, 160)
    assert new.ckv.shape == (2, 8, tiny_model.config.kv_lora_rank)
    # causal: the MTP logits at slot t do not depend on later tokens
    logits_prefix, _, _ = tiny_model.forward_mtp(ids[:, 1:5], main.hidden_states[:, :4])
    assert rel(logits[:, :4], logits_prefix) < 1e-5


def test_cache_is_latent_only(tiny_model: DeepseekV3ForCausalLM) -> None:
    out = tiny_model(torch.randint(0, 512, (1, 4)))
    c = tiny_model.config
    widths = {n.ckv.shape[-1] + n.kpe.shape[-1] for n in out.new_cache}
    assert widths == {c.kv_lora_rank + c.qk_rope_head_dim}
