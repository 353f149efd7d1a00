"""Logits for token windows from a checkpoint folder (PyTorch) or an export folder (onnxruntime).

Both go through the runtime's engines: PyTorch runs the reference model (naive MLA, as prefill does);
onnxruntime runs the folder's prefill graph through the runtime's bound sessions, so canonical, quantized
and lowered exports are scored by the same code that generates with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from dsv3c.errors import UserError
from dsv3c.runtime.engine import Engine
from dsv3c.runtime.loading import Runtime, choose_runtime


@dataclass
class Scorer:
    folder: Path
    runtime: Literal["torch", "ort"]
    engine: Engine

    @property
    def vocab_size(self) -> int:
        return self.engine.config.vocab_size

    def logits(self, ids: np.ndarray) -> torch.Tensor:
        """ids [B, W] -> float32 logits [B, W, vocab] on the CPU, each window from position 0."""
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

        engine: Engine = OrtEngine(folder, device, threads, roles=("prefill",))
        if "prefill" not in getattr(engine, "graphs", {}):
            raise UserError(f"{folder}: this export has no prefill graph, which scoring text needs")
    else:
        from dsv3c.runtime.loading import open_engine

        engine = open_engine(folder, "torch", device, dtype, threads)
    return Scorer(folder, chosen, engine)
