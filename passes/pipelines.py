"""The named pipelines: each one an explicit list of stages, built in one function."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from dsv3c.export.functions import ExpertSet
from dsv3c.models.fp8 import DEFAULT_BLOCK, Block
from dsv3c.passes.cleanup import LiftConstantsPass, cleanup_stages
from dsv3c.passes.fp8_activations import Fp8ActivationsPass
from dsv3c.passes.fp8_math import ActScheme, WeightScheme
from dsv3c.passes.fp8_weights import Fp8WeightsPass
from dsv3c.passes.inline import InlineCustomPass
from dsv3c.passes.lower_iree import DEFAULT_DIMS, BlockedQdqToMulPass, StaticShapesPass
from dsv3c.passes.lower_moe_body import MoEBodyPass
from dsv3c.passes.lower_mxfp8 import Mxfp8Form, Mxfp8WeightsPass, OnlineActivationsToMxfp8Pass
from dsv3c.passes.lower_ort import LowerMoEToOrtPass
from dsv3c.passes.lower_ort_8bit import Int8Options, MatMulNBitsPass, MoEToQMoEPass
from dsv3c.passes.lower_trt import ATTENTION_OPSET, MlaToAttentionPass, TrtQdqPass, UpgradeOpsetPass
from dsv3c.passes.merged_matmuls import MergedMatMulsPass
from dsv3c.passes.multiply_by_one import MultiplyByOnePass
from dsv3c.passes.ort_cache_in_place import CacheInPlacePass
from dsv3c.passes.ort_fusions import OrtFusionsPass
from dsv3c.passes.ort_fusions_rotary import OrtRotaryPass
from dsv3c.passes.ort_half_softmax import HalfSoftmaxPass
from dsv3c.passes.ort_rope_together import RopeTogetherPass
from dsv3c.passes.ort_split_past import SplitPastAttentionPass
from dsv3c.passes.policy import Policy
from dsv3c.passes.rope import RopeToRotaryEmbeddingPass
from dsv3c.passes.shared_shapes import SharedInputShapesPass
from dsv3c.passes.stages import Stage
from dsv3c.passes.transposed_weights import TransposedWeightsPass


@dataclass(frozen=True)
class QuantizeOptions:
    policy: Policy = field(default_factory=Policy)
    weights: WeightScheme = WeightScheme.BLOCK
    activations: ActScheme = ActScheme.TILE
    pow2_scales: bool = False
    block: Block = DEFAULT_BLOCK
    static_amax: dict[str, float] = field(default_factory=dict)  # calibrated, for ActScheme.STATIC

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_dict(),
            "weights": self.weights.value,
            "activations": self.activations.value,
            "pow2_scales": self.pow2_scales,
            "block": list(self.block),
        }


def quantize_pipeline(options: QuantizeOptions) -> list[Stage]:
    """FP8 weights the export holds already are kept as they are (fp8_weights.py)."""
    return [
        Stage("fp8-weights", Fp8WeightsPass(options.policy, options.weights, options.block)),
        Stage("fp8-activations", Fp8ActivationsPass(options.activations, options.pow2_scales, options.static_amax)),
        *cleanup_stages(),
    ]


class Target(enum.Enum):
    PORTABLE = "portable"  # standard ONNX only: the custom nodes' reference bodies inlined
    ORT = "ort"  # onnxruntime: com.microsoft::MoE, MLA inlined
    TRT = "trt"  # TensorRT: opset 23 Attention for MLA, MoE decomposed, constant Q/DQ scales
    IREE = "iree"  # IREE: inlined, fixed shapes, blocked Q/DQ as element-wise math


class DecodeCache(enum.Enum):
    """ort: how decode attention meets the step's new cache entries (`lower --decode-cache`)."""

    IN_PLACE = "in-place"  # written into the bound past buffer, attention over it (ort_cache_in_place.py)
    APART = "apart"  # returned; attention over the past and the new entries apart (ort_split_past.py)
    CONCAT = "concat"  # returned; attention over the exported Concat of the two


MXFP8_STAGE = "online-activations-to-mxfp8"
MXFP8_WEIGHTS_STAGE = "weights-to-mxfp8"


def mxfp8_stages(form: Mxfp8Form, mxfp8: bool, weights: bool) -> list[Stage]:
    """Online activation scales as MXFP8, and optionally the FP8 weights they meet (lower_mxfp8.py)."""
    stages = [Stage(MXFP8_STAGE, OnlineActivationsToMxfp8Pass(form))] if mxfp8 else []
    return stages + ([Stage(MXFP8_WEIGHTS_STAGE, Mxfp8WeightsPass(form))] if mxfp8 and weights else [])


def decode_cache_stages(decode_cache: DecodeCache) -> list[Stage]:
    if decode_cache == DecodeCache.IN_PLACE:
        return [Stage("cache-in-place", CacheInPlacePass())]
    return [Stage("attention-past-apart", SplitPastAttentionPass())] if decode_cache == DecodeCache.APART else []


def lower_pipeline(
    target: Target,
    dims: dict[str, int] | None = None,
    int8: Int8Options | None = None,
    mxfp8: bool = False,
    mxfp8_weights: bool = False,
    ort_fusions: bool = True,
    decode_cache: DecodeCache = DecodeCache.IN_PLACE,
    shared_experts_in_moe: bool = True,
) -> list[Stage]:
    """The stages that take a canonical (or quantized) export to `target`; `dims` fixes shapes (iree);
    `int8` (ort): 8-bit weights in MatMulNBits / QMoE (a MoE QMoE cannot take keeps float experts);
    `mxfp8`: online activation scales as MXFP8 (TensorRT's dynamic quantization for trt, its emulation in
    standard ONNX ops for portable and ort), `mxfp8_weights`: the FP8 weights they meet too;
    `ort_fusions` (ort): RMSNorm with the residual Add before it, and RoPE, as onnxruntime's fused ops
    (ort_fusions.py, ort_fusions_rotary.py); `decode_cache` (ort): decode writes its new cache entries into the
    bound past buffer and attends over it, or returns them and attends over past and new apart or concatenated;
    `shared_experts_in_moe` (ort, 16-bit graphs): the shared experts as always-chosen experts of
    com.microsoft::MoE (shared_experts.py)."""
    emulated = mxfp8_stages(Mxfp8Form.EMULATED, mxfp8, mxfp8_weights)
    if target == Target.PORTABLE:
        return [*emulated, Stage("inline-custom", InlineCustomPass()), *cleanup_stages()]
    if target == Target.ORT:
        eight_bit = []
        if int8 is not None:
            linears = MatMulNBitsPass(int8, shared_experts=shared_experts_in_moe)
            eight_bit = [
                *([Stage("linears-to-matmul-nbits", linears)] if int8.linears else []),
                Stage("moe-to-qmoe", MoEToQMoEPass(int8, shared_experts=shared_experts_in_moe)),
            ]
        return [
            *emulated,
            *eight_bit,
            Stage("moe-to-com-microsoft", LowerMoEToOrtPass(shared_experts=shared_experts_in_moe)),
            *decode_cache_stages(decode_cache),
            Stage("inline-custom", InlineCustomPass()),
            Stage("shared-input-shapes", SharedInputShapesPass()),  # the layers' masks: one, after the CSE
            *cleanup_stages(),
            Stage("multiply-by-one", MultiplyByOnePass()),  # where shapes are known
            Stage("weights-transposed", TransposedWeightsPass()),  # after fold-constants took out no-op Casts
            Stage("merged-matmuls", MergedMatMulsPass()),  # over the weights as stored
            *([Stage("ort-fusions", OrtFusionsPass()), Stage("ort-rotary", OrtRotaryPass())] if ort_fusions else []),
            *([Stage("rope-together", RopeTogetherPass())] if ort_fusions else []),  # after the merge and the rotary
            Stage("half-softmax", HalfSoftmaxPass()),
        ]
    if target == Target.TRT:
        return [
            Stage("mla-to-attention", MlaToAttentionPass()),
            Stage("moe-body-topk", MoEBodyPass(ExpertSet.TOP)),
            Stage("inline-custom", InlineCustomPass()),
            Stage("opset-23", UpgradeOpsetPass(ATTENTION_OPSET)),
            Stage("rope-to-rotary-embedding", RopeToRotaryEmbeddingPass()),
            *mxfp8_stages(Mxfp8Form.TRT, mxfp8, mxfp8_weights),
            Stage("constant-qdq-scales", TrtQdqPass()),
            Stage("lift-constants", LiftConstantsPass("lift-constants")),
            *cleanup_stages(),
        ]
    return [
        Stage("moe-body-topk", MoEBodyPass(ExpertSet.TOP)),
        Stage("inline-custom", InlineCustomPass()),
        Stage("static-shapes", StaticShapesPass({**DEFAULT_DIMS, **(dims or {})})),
        *cleanup_stages("shapes"),
        Stage("blocked-qdq-to-mul", BlockedQdqToMulPass()),
        *cleanup_stages(),
    ]
