"""PyTorch runtime: the reference model with its latent caches in preallocated per-layer buffers."""

from __future__ import annotations

import torch
from dsv3c.models.deepseek_v3 import AttentionPath, DeepseekV3ForCausalLM, LayerCache
from dsv3c.runtime.engine import EngineBackend, StepOutput
from dsv3c.runtime.latent_buffers import CacheShape, LatentBuffers


class TorchEngine:
    """Prefill uses the naive MLA path (compute-bound), decode the absorbed one over the latent cache.

    The past handed to the model is the buffer's prefix up to the longest row (a view, no copy); rows
    shorter than that are masked by `past_lengths` = positions[:, 0].
    """

    def __init__(self, model: DeepseekV3ForCausalLM, decode_path: AttentionPath = "absorbed"):
        self.model = model.eval()
        self.config = model.config
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.mtp_depth = len(model.mtp)
        self.has_mtp = self.mtp_depth > 0
        c = self.config
        self.cache_shape = CacheShape(c.num_hidden_layers, c.kv_lora_rank, c.qk_rope_head_dim, self.dtype)
        self.decode_path = decode_path
        self.cache: LatentBuffers | None = None
        self.mtp_caches: list[LatentBuffers] = []  # one one-layer cache per MTP module

    def start(self, batch: int, capacity: int) -> None:
        self.cache, self.mtp_caches = self.cache_shape.allocate(batch, capacity, self.device, False)[0], []
        for _ in range(self.mtp_depth):
            one = CacheShape(1, self.cache_shape.ckv_width, self.cache_shape.kpe_width, self.dtype)
            self.mtp_caches.append(one.allocate(batch, capacity, self.device, False)[0])

    def cache_bytes_per_token(self) -> int:
        return self.cache_shape.bytes_per_token

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> StepOutput:
        cache = self._cache(positions)
        out = self.model(ids, positions=positions, path="naive")
        for i, new in enumerate(out.new_cache):
            cache.write(i, new.ckv, new.kpe, positions)
        return StepOutput(out.logits, out.hidden_states)

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, positions: torch.Tensor) -> StepOutput:
        cache = self._cache(positions)
        lengths, used = positions[:, 0], int(positions[:, 0].max())
        past = [LayerCache(ckv[:, :used], kpe[:, :used]) for ckv, kpe in zip(cache.ckv, cache.kpe, strict=True)]
        out = self.model(ids, positions=positions, past=past, past_lengths=lengths, path=self.decode_path)
        for i, new in enumerate(out.new_cache):
            cache.write(i, new.ckv, new.kpe, positions)
        return StepOutput(out.logits, out.hidden_states)

    @torch.inference_mode()
    def mtp(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, depth: int = 0) -> StepOutput:
        if not 0 <= depth < len(self.mtp_caches):
            raise RuntimeError(f"no MTP module {depth} (this model has {self.mtp_depth}), or start() was not called")
        cache = self.mtp_caches[depth]
        cache.reserve(int(positions.max()) + 1)
        lengths, used = positions[:, 0], int(positions[:, 0].max())
        past = LayerCache(cache.ckv[0][:, :used], cache.kpe[0][:, :used])
        path = self.decode_path if used else "naive"
        logits, state, new = self.model.forward_mtp(
            next_ids, hidden.to(self.dtype), positions, past, lengths, depth=depth, path=path
        )
        cache.write(0, new.ckv, new.kpe, positions)
        return StepOutput(logits, state)

    def _cache(self, positions: torch.Tensor) -> LatentBuffers:
        if self.cache is None:
            raise RuntimeError("start() must be called before prefill or decode")
        self.cache.reserve(int(positions.max()) + 1)
        return self.cache


class TorchBackend(EngineBackend):
    """The generation loop's LogitsModel over the PyTorch model."""

    def __init__(self, model: DeepseekV3ForCausalLM, decode_path: AttentionPath = "absorbed"):
        super().__init__(TorchEngine(model, decode_path))
