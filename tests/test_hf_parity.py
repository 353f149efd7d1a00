"""Outside check of the model: transformers' DeepseekV3ForCausalLM on random tiny configs.

transformers saves the checkpoint; dsv3c loads it from disk, as a user would. Logits must agree within
1e-5 relative (fp32) and 16 greedy tokens must be identical.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from dsv3c.models.checkpoint import load_model  # noqa: E402
from dsv3c.runtime.generate import generate  # noqa: E402
from dsv3c.runtime.torch_backend import TorchBackend  # noqa: E402


def random_hf_config(seed: int) -> dict[str, Any]:
    """A tiny config drawn from the space the architecture allows (and transformers implements)."""
    rng = random.Random(seed)
    heads = rng.choice([2, 4])
    n_group = rng.choice([1, 2, 4])
    per_group = rng.choice([2, 4])
    experts = n_group * per_group
    topk_group = rng.randint(1, n_group)
    config: dict[str, Any] = {
        "vocab_size": rng.choice([97, 256]),
        "hidden_size": rng.choice([48, 64, 96]),
        "intermediate_size": rng.choice([64, 128]),
        "moe_intermediate_size": rng.choice([16, 32]),
        "num_hidden_layers": rng.choice([2, 3]),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": rng.choice([None, 24, 40]),
        "kv_lora_rank": rng.choice([16, 32]),
        "qk_nope_head_dim": rng.choice([8, 16]),
        "qk_rope_head_dim": rng.choice([4, 8]),
        "v_head_dim": rng.choice([8, 12]),
        "n_routed_experts": experts,
        "n_shared_experts": rng.choice([1, 2]),
        "num_experts_per_tok": rng.randint(1, min(4, topk_group * per_group)),
        "n_group": n_group,
        "topk_group": topk_group,
        "routed_scaling_factor": rng.choice([1.0, 2.5]),
        "norm_topk_prob": rng.choice([True, False]),
        "first_k_dense_replace": rng.choice([0, 1]),
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": rng.random() < 0.25,
        "initializer_range": 0.1,
        "attention_bias": rng.random() < 0.3,
        "num_nextn_predict_layers": 0,
    }
    if rng.random() < 0.6:
        mscale = rng.choice([1.0, 0.707])
        config["rope_parameters"] = {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": rng.choice([4.0, 40.0]),
            "original_max_position_embeddings": 64,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": mscale,
            "mscale_all_dim": rng.choice([mscale, 1.0]),
        }
    else:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": rng.choice([10000.0, 50000.0])}
    return config


def save_hf_model(config: dict[str, Any], seed: int, folder: Path) -> Any:
    torch.manual_seed(seed)
    hf_config = transformers.DeepseekV3Config(**config)
    model = transformers.DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:  # a non-zero selection bias, some of it large enough to go negative
                gate.e_score_correction_bias.normal_(0.0, 0.3)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # attention_bias: transformers initializes them to zero
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hf_greedy(model: Any, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(ids, use_cache=False).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_logits_and_greedy_tokens_match_transformers(seed: int, tmp_path: Path) -> None:
    config = random_hf_config(seed)
    hf = save_hf_model(config, seed, tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)
    ids = torch.from_numpy(np.random.default_rng(seed).integers(0, config["vocab_size"], (2, 11)))
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
        naive = ours(ids, path="naive").logits
        absorbed = ours(ids, path="absorbed").logits
    assert relative_error(naive, expected) < 1e-5, config
    assert relative_error(absorbed, expected) < 1e-5, config

    prompt = ids[0, :5].tolist()
    tokens = generate(TorchBackend(ours), [prompt], max_new_tokens=16)[0]
    assert tokens == hf_greedy(hf, prompt, 16), config
