"""PyTorch runtime: the reference model with its latent cache in preallocated per-layer buffers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from dsv3c.models.deepseek_v3 import AttentionPath, DeepseekV3ForCausalLM, LayerCache


class TorchBackend:
    """Prefill uses the naive MLA path (compute-bound), decode the absorbed one over the latent cache."""

    def __init__(self, model: DeepseekV3ForCausalLM, decode_path: AttentionPath = "absorbed"):
        self.model = model.eval()
        self.vocab_size = model.config.vocab_size
        self.max_positions = model.config.max_position_embeddings
        self.decode_path = decode_path
        self.cache: list[LayerCache] = []
        self.lengths = torch.zeros(0, dtype=torch.long)

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int) -> np.ndarray:
        c, batch = self.model.config, len(prompts)
        seq = max(len(p) for p in prompts)
        ids = torch.zeros(batch, seq, dtype=torch.long)  # right-padded; padding is never attended
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
        self.lengths = torch.tensor([len(p) for p in prompts])
        dtype = self.model.lm_head.weight.dtype
        self.cache = [
            LayerCache(torch.zeros(batch, capacity, c.kv_lora_rank, dtype=dtype),
                       torch.zeros(batch, capacity, c.qk_rope_head_dim, dtype=dtype))
            for _ in range(c.num_hidden_layers)
        ]  # fmt: skip
        out = self.model(ids, path="naive")
        for layer, new in zip(self.cache, out.new_cache, strict=True):
            layer.ckv[:, :seq], layer.kpe[:, :seq] = new.ckv, new.kpe
        last = out.logits[torch.arange(batch), self.lengths - 1]  # [B, V]
        return last.float().numpy()

    @torch.inference_mode()
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(tokens).long()[:, None]  # [B, 1]
        used = int(self.lengths.max())
        past = [LayerCache(layer.ckv[:, :used], layer.kpe[:, :used]) for layer in self.cache]
        out = self.model(ids, past=past, past_lengths=self.lengths, path=self.decode_path)
        rows = torch.arange(len(tokens))
        for layer, new in zip(self.cache, out.new_cache, strict=True):
            layer.ckv[rows, self.lengths], layer.kpe[rows, self.lengths] = new.ckv[:, 0], new.kpe[:, 0]
        self.lengths = self.lengths + 1
        return out.logits[:, -1].float().numpy()
