"""config.json, generated: any JSON (or bytes) gives a config or one ConfigError, never another exception,
and fails fast (a billion layers is refused, not allocated or traced)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from dsv3c.errors import UserError
from dsv3c.models.config import DeepseekV3Config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BASE = DeepseekV3Config.from_preset("tiny").to_dict()
FIELDS = [*sorted(BASE), "rope_parameters", "n_routed_experts", "q_lora_rank", "model_type", "unknown_key"]

numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 1, 2, 10**9, 2**63, 1024, 1025, 4096]),
    st.floats(allow_nan=True, allow_infinity=True),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
rope = st.fixed_dictionaries(
    {"type": st.sampled_from(["yarn", "linear", None, 3])},
    optional={
        "factor": json_values | numbers,
        "original_max_position_embeddings": json_values | numbers,
        "mscale": numbers,
        "beta_fast": numbers,
    },
)
quantization = st.fixed_dictionaries(
    {"quant_method": st.sampled_from(["fp8", "int4", None])},
    optional={
        "weight_block_size": st.lists(numbers, max_size=3) | json_values,
        "fmt": st.sampled_from(["e4m3", "e5m2"]),
    },
)


@st.composite
def edited_configs(draw: st.DrawFn) -> Any:
    """The tiny preset with a few fields replaced by generated values or removed."""
    config = dict(BASE)
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        action = draw(st.sampled_from(["number", "any", "delete", "rope", "quant"]))
        if action == "delete":
            config.pop(key, None)
        elif action == "rope":
            config["rope_scaling"] = draw(rope)
        elif action == "quant":
            config["quantization_config"] = draw(quantization)
        else:
            config[key] = draw(numbers if action == "number" else json_values)
    return config


def _load(raw: Any) -> None:
    try:
        DeepseekV3Config.from_dict(raw)
    except UserError as e:
        assert "\n" not in str(e) and str(e).startswith("config: ")


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edited_configs())
def test_edited_config_loads_or_is_one_user_error(raw: dict[str, Any]) -> None:
    _load(raw)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_at_the_top_level(raw: Any) -> None:
    _load(raw)


# JSON nested deeper than Python's parser recurses
deep_json = st.integers(1_000, 100_000).flatmap(lambda n: st.sampled_from(["[" * n, '{"a":' * n, "[" * n + "]" * n]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode) | deep_json.map(str.encode))
def test_any_bytes_as_config_json(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_bytes(data)
    try:
        DeepseekV3Config.from_json(path)
    except UserError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_hidden_layers", 10**9),
        ("vocab_size", 10**12),
        ("hidden_size", 2**40),
        ("n_routed_experts", 10**8),
        ("max_position_embeddings", 10**15),
        ("num_nextn_predict_layers", 10**6),
        ("rms_norm_eps", float("nan")),
        ("rope_theta", float("inf")),
    ],
)
def test_absurd_values_fail_at_once_naming_the_field(field: str, value: object, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, field: value}))
    start = time.perf_counter()
    with pytest.raises(UserError, match=field):
        DeepseekV3Config.from_json(tmp_path / "config.json")
    assert time.perf_counter() - start < 1.0


def test_json_nested_too_deep_is_one_config_error(tmp_path: Path) -> None:
    """Found by probing config.json with what the generated tests did not draw: RecursionError, a traceback."""
    (tmp_path / "config.json").write_text("[" * 50_000)
    with pytest.raises(UserError, match="nested too deep"):
        DeepseekV3Config.from_json(tmp_path / "config.json")
