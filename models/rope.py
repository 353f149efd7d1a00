"""YaRN rotary embeddings as DeepSeek applies them: interleaved pairs (x[2i], x[2i+1]) rotate together."""

from __future__ import annotations

import math

import torch
from dsv3c.models.config import DeepseekV3Config, yarn_mscale


def _correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (rotations * 2 * math.pi))) / (2 * math.log(base))


def inv_frequencies(config: DeepseekV3Config) -> torch.Tensor:
    """Per-pair inverse frequencies [rope_dim / 2], blended between interpolated and extrapolated by YaRN."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    extrapolated = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    yarn = config.rope_scaling
    if yarn is None:
        return extrapolated.float()
    original = yarn.original_max_position_embeddings
    low: float = max(math.floor(_correction_dim(yarn.beta_fast, dim, base, original)), 0)
    high: float = min(math.ceil(_correction_dim(yarn.beta_slow, dim, base, original)), dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: high-frequency pairs keep their frequency; 0: low ones are interpolated
    return (extrapolated / yarn.factor * (1 - keep) + extrapolated * keep).float()


def attention_factor(config: DeepseekV3Config) -> float:
    """Scale on cos/sin: mscale(mscale) / mscale(mscale_all_dim), 1.0 for V3 and V2-Lite as shipped.

    With either of the two unset (0), YaRN's default mscale(factor) applies, as in transformers.
    """
    yarn = config.rope_scaling
    if yarn is None:
        return 1.0
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return yarn_mscale(yarn.factor)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, S] -> cos, sin [B, S, rope_dim / 2] (float32)."""
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, S, R/2]
    return angles.cos() * factor, angles.sin() * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs. x [B, S, (H,) R]; cos/sin [B, S, R/2] broadcast over heads."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., R/2, 2]
    real, imag = pairs[..., 0], pairs[..., 1]
    out = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)  # [..., R/2, 2]
    return out.flatten(-2).to(x.dtype)
