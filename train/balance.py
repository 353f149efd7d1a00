"""Expert load during training: routed-token counts per MoE layer, the bias update, the balance loss.

Forward hooks on every Router (main layers and MTP blocks) record which experts each token selected;
the model itself is untouched. After each optimizer step, each router's `e_score_correction_bias`
moves by gamma toward balance (models/balancing.py). With alpha > 0 the hook also computes
DeepSeek-V3's complementary sequence-wise balance loss (eq. 17-20):
    L_bal = alpha * sum_i f_i P_i,  f_i = E / (K T) * #{t : i in topk(t)},  P_i = mean_t s_i,t / sum_j s_j,t
per sequence, averaged over the batch and summed over MoE layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from dsv3c.models.balancing import expert_counts, update_correction_bias
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM, Router
from torch import nn


class LoadTracker:
    def __init__(self, model: DeepseekV3ForCausalLM, alpha: float):
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.alpha = alpha
        self.batch_size = 1
        # on the router's device: a host copy in the hook would wait for the GPU in every MoE layer's forward
        self.counts = [torch.zeros(r.weight.shape[0], device=r.weight.device) for r in self.routers]
        self.loss_terms: list[torch.Tensor] = []
        self.tracking = True
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, index: int) -> Any:
        def hook(
            router: nn.Module, inputs: tuple[torch.Tensor, ...], output: tuple[torch.Tensor, torch.Tensor]
        ) -> None:
            if not self.tracking:
                return
            indices = output[1]  # [N, k]
            n_experts = self.counts[index].numel()
            counts = expert_counts(indices.detach(), n_experts)
            if self.counts[index].device != counts.device:  # the model moved after the tracker was made
                self.counts[index] = self.counts[index].to(counts.device)
            self.counts[index] += counts.float()
            if self.alpha > 0 and router.training:
                assert isinstance(router, Router)
                self.loss_terms.append(self._sequence_loss(router, inputs[0], indices, n_experts))

        return hook

    def _sequence_loss(self, router: Router, x: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
        logits = F.linear(x.float(), router.weight.float())  # [N, E], as the router computes them
        scores = logits.sigmoid() if router.scoring_func == "sigmoid" else logits.softmax(-1)
        scores = scores.unflatten(0, (self.batch_size, -1))  # [B, T, E]
        tokens, k = scores.shape[1], indices.shape[-1]
        probs = (scores / scores.sum(-1, keepdim=True)).mean(1)  # P_i [B, E]
        chosen = torch.zeros_like(scores).scatter_(-1, indices.unflatten(0, (self.batch_size, -1)), 1.0)
        f = chosen.sum(1) * n_experts / (k * tokens)  # f_i [B, E]
        return (f * probs).sum(-1).mean()

    def take_loss(self) -> torch.Tensor | None:
        terms, self.loss_terms = self.loss_terms, []
        return self.alpha * torch.stack(terms).sum() if terms else None

    def step(self, gamma: float) -> dict[str, float]:
        """After an optimizer step: move the biases by gamma; return this step's load and reset the counts."""
        ratios = []
        # one wait for the device per step: every layer's counts come to the host together
        on_host = torch.cat(self.counts).cpu().split([c.numel() for c in self.counts]) if self.counts else ()
        for router, counts, host in zip(self.routers, self.counts, on_host, strict=True):
            if host.sum() > 0:
                ratios.append(float(host.max() / host.mean()))
                if gamma > 0 and router.e_score_correction_bias is not None:
                    bias = router.e_score_correction_bias
                    bias.data = update_correction_bias(bias.data, counts.to(bias.device), gamma)
            counts.zero_()
        if not ratios:
            return {}
        return {"load_max_mean": sum(ratios) / len(ratios), "load_max_mean_worst": max(ratios)}
