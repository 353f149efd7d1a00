"""Logits for token windows from a checkpoint folder (PyTorch) or an export folder (onnxruntime).

Both go through the runtime's engines: PyTorch runs the reference model (naive MLA, as prefill does);
onnxruntime runs the folder's prefill graph through the runtime's bound sessions, so canonical, quantized
and lowered exports are scored by the same code that generates with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from dsv3c.errors import UserError
from dsv3c.runtime.engine import Engine
from dsv3c.runtime.loading import Runtime, choose_runtime


class ScorerLike(Protocol):
    folder: Path
    runtime: str

    @property
    def vocab_size(self) -> int: ...

    def logits(self, ids: np.ndarray) -> torch.Tensor: ...


@dataclass
class Scorer:
    folder: Path
    runtime: str
    engine: Engine
    fixed_batch: int | None = None  # a graph lowered with a fixed batch (iree) runs that many rows at a time

    @property
    def vocab_size(self) -> int:
        return self.engine.config.vocab_size

    def logits(self, ids: np.ndarray) -> torch.Tensor:
        """ids [B, W] -> float32 logits [B, W, vocab] on the CPU, each window from position 0."""
        step = self.fixed_batch
        if step is not None and ids.shape[0] != step:
            return torch.cat([self.logits(ids[i : i + step]) for i in range(0, ids.shape[0], step)])
        batch = torch.from_numpy(ids).to(self.engine.device)
        positions = torch.arange(ids.shape[1], device=self.engine.device).expand(ids.shape[0], -1).contiguous()
        self.engine.start(ids.shape[0], ids.shape[1])
        return self.engine.prefill(batch, positions).logits.float().cpu()


def open_scorer(
    folder: Path,
    runtime: Runtime = "auto",
    device: Literal["cpu", "cuda"] = "cpu",
    dtype: str = "fp32",
    threads: int = 0,
) -> Scorer:
    chosen = choose_runtime(folder, runtime)
    if chosen == "ort":
        from dsv3c.runtime.ort_backend import OrtEngine

        ort_engine = OrtEngine(folder, device, threads, roles=("prefill",))
        if "prefill" not in ort_engine.graphs:
            raise UserError(f"{folder}: this export has no prefill graph, which scoring text needs")
        rows = ort_engine.manifest.signatures["prefill"].inputs[0].shape[0]
        return Scorer(folder, chosen, ort_engine, rows if isinstance(rows, int) else None)
    from dsv3c.runtime.loading import open_engine

    return Scorer(folder, chosen, open_engine(folder, "torch", device, dtype, threads))
