"""A MoE layer's routed experts as two grouped GEMMs (torch._grouped_mm) instead of three GEMMs per expert.

The model's MoE (models/) runs its experts one after another: in BF16 training on the H200 that loop's
host work bounds bench-moe's step (563 ms of wall clock for 216 ms of CUDA time, 32 experts x 8 layers).
Here the (token, slot) rows sorted by expert go through gate and up at once ([E, D, 2 ff]) and down
([E, ff, D]), each one grouped GEMM over the experts that got tokens. The result is MoE.routed's: the same
rows, weights and ascending-expert accumulation; only the GEMMs' summation order may differ. Idle experts
take no part, so they get no gradient (None), as in the loop: AdamW leaves them alone.

CUDA runs the GEMMs in bfloat16 (torch's grouped GEMM has bf16 kernels on sm90), as autocast would; the
CPU in the input's dtype (the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dsv3c.models.deepseek_v3 import MLP, MoE, sort_by_expert

_FAILED: list[str] = []  # set once torch._grouped_mm refused: the loop from then on


class GroupedMoE(MoE):
    """MoE whose routed experts run as grouped GEMMs (made from a MoE in place; weights unchanged)."""

    def routed(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if not _FAILED:
            try:
                return self._grouped(flat, weights, indices)
            except RuntimeError as e:  # a device or torch without these kernels must not stop training
                import warnings

                warnings.warn(f"torch._grouped_mm failed ({e}); running the experts one by one", stacklevel=2)
                _FAILED.append(str(e))
        return super().routed(flat, weights, indices)

    def _grouped(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        tokens, slots, counts = sort_by_expert(indices, len(self.experts))  # as MoE.routed
        active = [e for e, c in enumerate(counts.tolist()) if c]  # the layer's one wait for the device
        experts: list[MLP] = [self.experts[e] for e in active]  # type: ignore[misc]
        dtype = torch.bfloat16 if flat.is_cuda else flat.dtype
        ends = counts[active].cumsum(0).to(torch.int32)
        inter = experts[0].gate_proj.weight.shape[0]
        # [E, D, 2 ff] and [E, ff, D]: the [out, in] weights transposed (column-major, as the kernel takes them)
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts]).transpose(1, 2)
        down = torch.stack([e.down_proj.weight for e in experts]).transpose(1, 2)
        gu = torch._grouped_mm(flat[tokens].to(dtype), gate_up.to(dtype), offs=ends)
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        y = torch._grouped_mm(h, down.to(dtype), offs=ends)
        out = torch.zeros_like(flat, dtype=torch.float32)
        out.index_add_(0, tokens, y.float() * weights[tokens, slots, None])
        return out


def group_experts(model: torch.nn.Module) -> int:
    """Turn every plain MoE of `model` into GroupedMoE in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is MoE:
            module.__class__ = GroupedMoE
            count += 1
    return count
