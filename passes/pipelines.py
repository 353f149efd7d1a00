"""The named pipelines: each one an explicit list of stages, built in one function."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsv3c.models.fp8 import DEFAULT_BLOCK, Block
from dsv3c.passes.cleanup import cleanup_stages
from dsv3c.passes.fp8_activations import Fp8ActivationsPass
from dsv3c.passes.fp8_math import ActScheme, WeightScheme
from dsv3c.passes.fp8_weights import Fp8WeightsPass
from dsv3c.passes.pipeline import Stage
from dsv3c.passes.policy import Policy


@dataclass(frozen=True)
class QuantizeOptions:
    policy: Policy = field(default_factory=Policy)
    weights: WeightScheme = WeightScheme.BLOCK
    activations: ActScheme = ActScheme.TILE
    pow2_scales: bool = False
    block: Block = DEFAULT_BLOCK
    static_amax: dict[str, float] = field(default_factory=dict)  # calibrated, for ActScheme.STATIC

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "weights": self.weights.value, "activations": self.activations.value,
                "pow2_scales": self.pow2_scales, "block": list(self.block)}  # fmt: skip


def quantize_pipeline(options: QuantizeOptions) -> list[Stage]:
    return [
        Stage("fp8-weights", Fp8WeightsPass(options.policy, options.weights, options.block)),
        Stage("fp8-activations", Fp8ActivationsPass(options.activations, options.pow2_scales, options.static_amax)),
        *cleanup_stages(),
    ]
