"""DeepseekV3Config: Hugging Face `config.json` for DeepSeek-V3 / R1 / V2-Lite-shaped models.

Every field the architecture uses is typed and checked; keys it does not use (`auto_map`, `ep_size`,
`torch_dtype`, ...) are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from dsv3c.errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"
ScoringFunc = Literal["sigmoid", "softmax"]
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE extension (DeepSeek's `rope_scaling` with type "yarn")."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"type": "yarn", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Fp8Quantization:
    """`quantization_config` of an FP8 checkpoint: E4M3 weights with one scale per block."""

    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    fmt: str = "e4m3"

    def to_dict(self) -> dict[str, Any]:
        return {
            "activation_scheme": self.activation_scheme,
            "fmt": self.fmt,
            "quant_method": "fp8",
            "weight_block_size": list(self.weight_block_size),
        }


@dataclass
class DeepseekV3Config:
    # sizes
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    # mla
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: a plain q_proj
    attention_bias: bool = False
    # moe
    n_routed_experts: int | None = None  # None: every layer dense
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    scoring_func: ScoringFunc = "softmax"
    topk_method: TopkMethod = "greedy"
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    # rope
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    max_position_embeddings: int = 4096
    # misc
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    quantization_config: Fp8Quantization | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values per token per layer in the latent cache: c_kv plus the shared RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, index: int) -> bool:
        return (
            self.n_routed_experts is not None
            and index >= self.first_k_dense_replace
            and index % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale(mscale_all_dim)^2 when YaRN is on."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    # ---- reading ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DeepseekV3Config:
        if not isinstance(raw, dict):
            raise ConfigError("config: expected a JSON object at the top level")
        data = {**_ROUTING_DEFAULTS.get(str(raw.get("model_type", "deepseek_v3")), {}), **raw}
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in ("extra", "rope_scaling", "quantization_config", "rope_theta"):
                continue
            if f.name not in data:
                if f.default is dataclasses.MISSING:
                    raise ConfigError(f"config: required field '{f.name}' is missing")
                continue
            kwargs[f.name] = _check_type(f.name, data.pop(f.name), str(f.type))
        rope_theta, scaling = _read_rope(data)
        kwargs["rope_theta"] = rope_theta
        kwargs["rope_scaling"] = scaling
        kwargs["quantization_config"] = _read_quantization(data.pop("quantization_config", None))
        data.pop("num_key_value_heads", None)  # MLA: always equal to the head count
        kwargs["extra"] = data
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> DeepseekV3Config:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file; a checkpoint folder needs a config.json") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (config.json must be UTF-8 JSON)") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        except RecursionError:  # arrays or objects nested thousands deep
            raise ConfigError(f"{path}: not valid JSON (nested too deep)") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_preset(cls, name: str) -> DeepseekV3Config:
        path = PRESETS_DIR / f"{name}.json"
        if not path.is_file():
            raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(preset_names())}")
        return cls.from_json(path)

    # ---- writing ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_scaling", "quantization_config"):
                continue
            out[f.name] = getattr(self, f.name)
        out["num_key_value_heads"] = self.num_attention_heads
        out["rope_scaling"] = self.rope_scaling.to_dict() if self.rope_scaling else None
        if self.quantization_config is not None:
            out["quantization_config"] = self.quantization_config.to_dict()
        else:
            out.pop("quantization_config", None)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> DeepseekV3Config:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    # ---- consistency -------------------------------------------------------------------------------
    def validate(self) -> None:
        self._validate_bounds()
        positive = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config: '{name}' must be positive, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError("config: 'q_lora_rank' must be positive or null (null: a plain q_proj)")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"config: 'qk_rope_head_dim' must be even, got {self.qk_rope_head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"config: 'hidden_act' must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if self.rms_norm_eps <= 0:
            raise ConfigError("config: 'rms_norm_eps' must be positive")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError("config: 'num_nextn_predict_layers' must be >= 0")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                f"config: 'first_k_dense_replace' ({self.first_k_dense_replace}) must be between 0 and "
                f"num_hidden_layers ({self.num_hidden_layers})"
            )
        if self.moe_layer_freq < 1:
            raise ConfigError("config: 'moe_layer_freq' must be >= 1")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"config: 'scoring_func' must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ConfigError(
                f"config: 'topk_method' must be one of greedy, group_limited_greedy, noaux_tc, got {self.topk_method!r}"
            )
        if self.n_routed_experts is not None:
            self._validate_moe()
        if self.rope_scaling is not None and self.rope_scaling.factor < 1:
            raise ConfigError("config: 'rope_scaling.factor' must be >= 1")
        if self.tie_word_embeddings and self.num_nextn_predict_layers:
            pass  # allowed: the MTP head then shares the tied embedding too

    def _validate_bounds(self) -> None:
        """Absurd values fail here, at once, before anything is allocated or traced (a billion layers)."""
        for name, limit in _UPPER_BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and value > limit:
                raise ConfigError(f"config: '{name}' is {value}, above dsv3c's limit of {limit:,}; is it a typo?")
        for name in ("rope_theta", "rms_norm_eps", "routed_scaling_factor"):
            value = getattr(self, name)
            if not math.isfinite(value) or abs(value) > 1e12:
                raise ConfigError(f"config: '{name}' must be a finite number of sensible size, got {value!r}")
        if self.rope_theta <= 0:
            raise ConfigError(f"config: 'rope_theta' must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None:
            r = self.rope_scaling
            for key in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                value = getattr(r, key)
                if not math.isfinite(value) or abs(value) > 1e6:
                    raise ConfigError(f"config: 'rope_scaling.{key}' must be a finite number, got {value!r}")
            if not 0 < r.original_max_position_embeddings <= _UPPER_BOUNDS["max_position_embeddings"]:
                raise ConfigError(
                    "config: 'rope_scaling.original_max_position_embeddings' must be between 1 and "
                    f"{_UPPER_BOUNDS['max_position_embeddings']:,}, got {r.original_max_position_embeddings}"
                )
        if self.quantization_config is not None:
            block = self.quantization_config.weight_block_size
            if max(block) > _MAX_BLOCK:
                raise ConfigError(
                    f"config: 'quantization_config.weight_block_size' {list(block)} is above {_MAX_BLOCK} per axis"
                )
        ids = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for key, values in (("bos_token_id", [self.bos_token_id]), ("eos_token_id", ids)):
            if any(v is not None and not 0 <= v < self.vocab_size for v in values):
                raise ConfigError(f"config: '{key}' {values} must lie in [0, vocab_size = {self.vocab_size})")

    def _validate_moe(self) -> None:
        n = cast(int, self.n_routed_experts)
        if n <= 0:
            raise ConfigError("config: 'n_routed_experts' must be positive or null")
        if self.num_experts_per_tok is None or not 0 < self.num_experts_per_tok <= n:
            raise ConfigError(
                f"config: 'num_experts_per_tok' ({self.num_experts_per_tok}) must be between 1 and "
                f"n_routed_experts ({n})"
            )
        if self.moe_intermediate_size <= 0:
            raise ConfigError("config: 'moe_intermediate_size' must be positive when experts are routed")
        if self.n_group < 1 or n % self.n_group:
            raise ConfigError(f"config: 'n_group' ({self.n_group}) must divide n_routed_experts ({n})")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(
                f"config: 'topk_group' ({self.topk_group}) must be between 1 and n_group ({self.n_group})"
            )
        if self.topk_method == "noaux_tc" and self.n_group > 1 and n // self.n_group < 2:
            raise ConfigError(
                f"config: noaux_tc ranks expert groups by their two best experts, so n_routed_experts ({n}) / "
                f"n_group ({self.n_group}) must be at least 2"
            )
        reachable = self.topk_group * (n // self.n_group)
        if self.num_experts_per_tok > reachable:
            raise ConfigError(
                f"config: 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds the {reachable} experts in "
                f"topk_group ({self.topk_group}) groups of {n // self.n_group}"
            )
        if self.routed_scaling_factor <= 0:
            raise ConfigError("config: 'routed_scaling_factor' must be positive")
        if self.n_shared_experts is not None and self.n_shared_experts < 0:
            raise ConfigError("config: 'n_shared_experts' must be >= 0 or null")


# Upper bounds far above any model of the family (DeepSeek-V3: 61 layers, hidden 7168, 256 experts, 129280
# tokens, 163840 positions): a value beyond them is a typo, and would otherwise allocate or trace for hours.
_UPPER_BOUNDS: dict[str, int] = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 4096,
    "kv_lora_rank": 1 << 16,
    "qk_nope_head_dim": 1 << 12,
    "qk_rope_head_dim": 1 << 12,
    "v_head_dim": 1 << 12,
    "q_lora_rank": 1 << 17,
    "n_routed_experts": 1 << 14,
    "n_shared_experts": 1 << 10,
    "num_experts_per_tok": 1 << 14,
    "moe_intermediate_size": 1 << 20,
    "n_group": 1 << 14,
    "topk_group": 1 << 14,
    "first_k_dense_replace": 1024,
    "moe_layer_freq": 1024,
    "max_position_embeddings": 1 << 24,
    "num_nextn_predict_layers": 64,
}
_MAX_BLOCK = 1 << 16

# Routing keys a config.json may leave out (transformers' DeepseekV3Config has none of them): the
# defaults of the architecture named by model_type.
_ROUTING_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True},
    "deepseek_v2": {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False},
}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---- field readers ---------------------------------------------------------------------------------


def _check_type(name: str, value: Any, annotation: str) -> Any:
    """Check `value` against the field's (string) annotation; ints are accepted where floats are."""
    allowed = [a.strip() for a in annotation.split("|")]
    if value is None:
        if "None" in allowed:
            return None
        raise ConfigError(f"config: field '{name}' must not be null")
    for a in allowed:
        if a == "bool" and isinstance(value, bool):
            return value
        if a == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if a == "float" and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if a in ("str", "ScoringFunc", "TopkMethod") and isinstance(value, str):
            return value
        if a == "list[int]" and isinstance(value, list) and all(isinstance(v, int) for v in value):
            return value
    raise ConfigError(f"config: field '{name}' must be {annotation.replace('|', 'or')}, got {value!r}")


def _read_rope(data: dict[str, Any]) -> tuple[float, YarnScaling | None]:
    """YaRN from `rope_scaling` (DeepSeek, transformers 4) or `rope_parameters` (transformers 5)."""
    theta = data.pop("rope_theta", None)
    params = data.pop("rope_parameters", None)
    scaling = data.pop("rope_scaling", None)
    if scaling is None and isinstance(params, dict):
        scaling = params
        theta = params.get("rope_theta", theta)
    theta = _check_type("rope_theta", 10000.0 if theta is None else theta, "float")
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise ConfigError(f"config: 'rope_scaling' must be an object or null, got {scaling!r}")
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind in (None, "default"):
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"config: 'rope_scaling.type' {kind!r} is not supported; DeepSeek models use 'yarn'")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise ConfigError(f"config: 'rope_scaling.{key}' is missing (YaRN needs it)")
    factor = float(_check_type("rope_scaling.factor", scaling["factor"], "float"))
    original = int(
        _check_type("rope_scaling.original_max_position_embeddings", scaling["original_max_position_embeddings"], "int")
    )
    keys = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")
    defaults = YarnScaling(factor, original)
    values = {k: float(_check_type(f"rope_scaling.{k}", scaling.get(k, getattr(defaults, k)), "float")) for k in keys}
    return theta, YarnScaling(factor=factor, original_max_position_embeddings=original, **values)


def _read_quantization(raw: Any) -> Fp8Quantization | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError("config: 'quantization_config' must be an object")
    method = raw.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"config: 'quantization_config.quant_method' {method!r} is not supported; only 'fp8' is")
    block = raw.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"config: 'quantization_config.weight_block_size' must be two positive ints, got {block!r}")
    fmt = raw.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"config: 'quantization_config.fmt' {fmt!r} is not supported; only 'e4m3' is")
    return Fp8Quantization((block[0], block[1]), str(raw.get("activation_scheme", "dynamic")), fmt)
