"""Every training knob in one typed config (saved with the training state, so a resume checks it)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dsv3c.errors import UserError
from dsv3c.models.config import DeepseekV3Config, preset_names

Precision = Literal["fp32", "bf16", "fp8"]
TRAIN_PRESETS = Path(__file__).parent / "presets"  # training-only model shapes (the eval and bench models)


@dataclass(frozen=True)
class TrainConfig:
    # run
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    precision: Precision = "bf16"
    device: str = "cpu"
    # optimizer: AdamW with float32 master weights, linear warmup then cosine decay to min_lr_ratio * lr
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    # losses: MTP weight lambda (V3 used 0.3, later 0.1), sequence-wise balance alpha (V3: 1e-4)
    mtp_lambda: float = 0.3
    balance_alpha: float = 1e-4
    # auxiliary-loss-free balancing: bias step gamma per training step (V3: 1e-3); 0 turns it off
    bias_gamma: float = 1e-3
    # fp8 recipe
    fp8_granularity: Literal["block", "tensor"] = "block"
    fp8_pow2: bool = False
    fp8_compile: bool = True
    # data, evaluation, saving
    val_fraction: float = 0.02
    val_every: int = 50
    val_batches: int = 8
    log_every: int = 10
    save_every: int = 100

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {k: (tuple(v) if k == "betas" else v) for k, v in raw.items() if k in known}
        return cls(**values)

    def check(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "val_every", "log_every", "save_every", "val_batches"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.precision not in ("fp32", "bf16", "fp8"):
            raise UserError(f"--precision must be fp32, bf16 or fp8, got {self.precision!r}")
        weights = (self.bias_gamma, self.balance_alpha, self.mtp_lambda)
        if not (self.lr > 0 and all(w >= 0 for w in weights) and all(map(math.isfinite, (self.lr, *weights)))):
            raise UserError("--lr must be > 0; --gamma, --alpha and --mtp-lambda must be >= 0 (all finite numbers)")


def all_preset_names() -> list[str]:
    return sorted(set(preset_names()) | {p.stem for p in TRAIN_PRESETS.glob("*.json")})


def model_config(preset: str | None, config_file: Path | None) -> DeepseekV3Config:
    """The model shape from --preset (model or training preset) or --config FILE."""
    if config_file is not None:
        if not config_file.is_file():
            raise UserError(f"--config {config_file}: no such file")
        return DeepseekV3Config.from_json(config_file)
    assert preset is not None
    own = TRAIN_PRESETS / f"{preset}.json"
    if own.is_file():
        return DeepseekV3Config.from_json(own)
    if preset not in preset_names():
        raise UserError(f"unknown preset '{preset}'; choose one of: {', '.join(all_preset_names())}")
    return DeepseekV3Config.from_preset(preset)


def config_hash(config: DeepseekV3Config, train: TrainConfig) -> str:
    import hashlib

    text = json.dumps({"model": config.to_dict(), "train": train.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
