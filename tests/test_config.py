"""config.json reading and writing: presets, transformers 5 rope_parameters, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dsv3c.errors import ConfigError
from dsv3c.models.config import DeepseekV3Config, preset_names


def test_presets_load_and_round_trip(tmp_path: Path) -> None:
    assert set(preset_names()) >= {"tiny", "small", "v2-lite", "v3"}
    for name in preset_names():
        config = DeepseekV3Config.from_preset(name)
        config.save(tmp_path / "config.json")
        assert DeepseekV3Config.from_json(tmp_path / "config.json") == config


def test_v3_shapes_and_softmax_scale() -> None:
    v3 = DeepseekV3Config.from_preset("v3")
    assert v3.cache_width * v3.num_hidden_layers * 2 == 70_272  # bytes per token in bf16
    assert v3.softmax_scale == pytest.approx(192**-0.5 * (0.1 * __import__("math").log(40) + 1) ** 2)
    assert [v3.is_moe_layer(i) for i in range(4)] == [False, False, False, True]
    assert v3.extra["auto_map"]["AutoConfig"].endswith("DeepseekV3Config")  # unused keys are kept
    assert v3.quantization_config is not None and v3.quantization_config.weight_block_size == (128, 128)


def test_v2_lite_has_plain_q_proj_and_softmax_routing() -> None:
    lite = DeepseekV3Config.from_preset("v2-lite")
    assert lite.q_lora_rank is None and lite.scoring_func == "softmax" and lite.topk_method == "greedy"


def test_rope_parameters_of_transformers_5() -> None:
    raw = DeepseekV3Config.from_preset("tiny").to_dict()
    yarn = raw.pop("rope_scaling")
    raw.pop("rope_theta")
    raw["rope_parameters"] = {
        **{k: v for k, v in yarn.items() if k != "type"},
        "rope_type": "yarn",
        "rope_theta": 5e4,
    }
    config = DeepseekV3Config.from_dict(raw)
    assert config.rope_theta == 5e4 and config.rope_scaling is not None and config.rope_scaling.factor == 4.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": None}, "'hidden_size' must not be null"),
        ({"hidden_size": "64"}, "'hidden_size' must be int"),
        ({"n_group": 3}, "'n_group' (3) must divide n_routed_experts (8)"),
        ({"topk_group": 5}, "'topk_group' (5) must be between 1 and n_group (4)"),
        ({"num_experts_per_tok": 6, "topk_group": 2}, "exceeds the 4 experts"),
        ({"scoring_func": "relu"}, "'scoring_func' must be 'sigmoid' or 'softmax'"),
        ({"first_k_dense_replace": 9}, "'first_k_dense_replace' (9) must be between 0"),
        ({"qk_rope_head_dim": 15}, "'qk_rope_head_dim' must be even"),
        ({"rope_scaling": {"type": "yarn", "factor": 4}}, "'rope_scaling.original_max_position_embeddings'"),
        ({"quantization_config": {"quant_method": "awq"}}, "'quantization_config.quant_method'"),
        ({"n_group": 8, "topk_group": 4}, "n_group (8) must be at least 2"),
        (
            {"rope_scaling": {"type": "yarn", "factor": "4", "original_max_position_embeddings": 256}},
            "'rope_scaling.factor' must be float",
        ),
    ],
)
def test_bad_fields_are_named(change: dict, message: str) -> None:
    raw = {**DeepseekV3Config.from_preset("tiny").to_dict(), **change}
    with pytest.raises(ConfigError) as e:
        DeepseekV3Config.from_dict(raw)
    assert message in str(e.value)


def test_missing_field_and_bad_files(tmp_path: Path) -> None:
    raw = DeepseekV3Config.from_preset("tiny").to_dict()
    del raw["kv_lora_rank"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="required field 'kv_lora_rank' is missing"):
        DeepseekV3Config.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        DeepseekV3Config.from_json(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="no such file"):
        DeepseekV3Config.from_json(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        DeepseekV3Config.from_preset("huge")
