"""Logits from IREE: the iree-lowered prefill graph imported to MLIR, compiled for the CPU, and run.

The lowering fixes every dimension (batch, seq), so windows run in groups of that batch and must be
that long; the compiled module is cached beside the lowered folder's graphs in `work`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from dsv3c.artifact.manifest import read_manifest
from dsv3c.errors import UserError


@dataclass
class IreeScorer:
    folder: Path
    vmfb: Path
    vocab_size: int
    batch: int
    seq: int
    input_names: list[str]
    runtime: str = field(default="iree")

    def logits(self, ids: np.ndarray) -> torch.Tensor:
        from dsv3c.passes.mlir import run_vmfb

        if ids.shape[1] != self.seq:
            raise UserError(f"{self.folder} was lowered for windows of {self.seq} tokens, not {ids.shape[1]}")
        rows = []
        for i in range(0, ids.shape[0], self.batch):
            chunk = ids[i : i + self.batch]
            if chunk.shape[0] != self.batch:
                raise UserError(f"{self.folder} runs {self.batch} windows at a time; give a multiple of that")
            positions = np.tile(np.arange(self.seq, dtype=np.int64), (self.batch, 1))
            feeds = {"input_ids": chunk, "positions": positions}
            logits = run_vmfb(self.vmfb, "prefill", [feeds[n] for n in self.input_names])[0]
            rows.append(torch.from_numpy(np.asarray(logits, dtype=np.float32)))
        return torch.cat(rows)


def open_iree_scorer(folder: Path, work: Path) -> IreeScorer:
    from dsv3c.passes.mlir import compile_mlir, import_onnx, iree_available

    reason = iree_available()
    if reason:
        raise UserError(reason)
    manifest = read_manifest(folder)
    signature = manifest.signatures["prefill"]
    batch, seq = signature.inputs[0].shape[:2]
    if not isinstance(batch, int) or not isinstance(seq, int):
        raise UserError(f"{folder}: IREE runs fixed shapes; lower with --target iree --shape batch=B,seq=W")
    work.mkdir(parents=True, exist_ok=True)
    vmfb = work / "prefill.vmfb"
    if not vmfb.is_file():
        mlir = import_onnx(folder / "prefill.onnx", work / "prefill.mlir")
        compile_mlir(mlir, vmfb)
    names = [t.name for t in signature.inputs]
    return IreeScorer(folder, vmfb, int(manifest.config["vocab_size"]), batch, seq, names)
