"""The original FP8 bytes of an export's source checkpoint, so that quantizing never re-quantizes them.

A float32 export of an FP8 checkpoint holds exactly the dequantized weights, and re-quantizing them
gives back the checkpoint's bytes (models/fp8.py recognises the grid). A bfloat16 export has lost the
low bits, so the quantize pass reads the checkpoint instead, tensor by tensor (safetensors is random
access), when the export's first stage names a checkpoint folder that is still there with the same
config. Each tensor is used only if dequantizing it and rounding to bfloat16, float16 or float32 gives
the exported weight bit for bit; otherwise that weight is quantized from the export as usual.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from dsv3c.artifact.manifest import Manifest
from dsv3c.errors import UserError
from dsv3c.export.source import config_sha256
from dsv3c.models.checkpoint import CheckpointIndex, read_index
from dsv3c.models.checkpoint_layout import SCALE_SUFFIX
from dsv3c.models.fp8 import FP8_DTYPE, dequantize_block_fp8
from safetensors import safe_open

_FP8 = "F8_E4M3"
_ROUNDINGS = (torch.float32, torch.bfloat16, torch.float16)


class CheckpointFp8:
    """fp8 weight + scale_inv of a checkpoint by export weight name (stacked experts stacked)."""

    def __init__(self, index: CheckpointIndex) -> None:
        self.index = index

    @classmethod
    def for_export(cls, manifest: Manifest) -> tuple[CheckpointFp8 | None, str]:
        """The export's source checkpoint if it is FP8 and still there; else None and the reason."""
        stage = manifest.stages[0] if manifest.stages else {}
        if stage.get("source_kind") != "checkpoint":
            return None, "the export was not made from a checkpoint"
        source = Path(str(stage.get("source_path") or stage.get("source", "")))  # older exports: as given
        candidates = [source] if source.is_absolute() else [Path.cwd() / source]
        if manifest.folder is not None and not source.is_absolute():
            candidates.append(manifest.folder.resolve().parent / source)
        folder = next((c for c in candidates if (c / "config.json").is_file()), None)
        if folder is None:
            return None, f"its source checkpoint {source} is not found"
        try:
            index = read_index(folder)
        except UserError as e:
            return None, f"its source checkpoint {folder} is unreadable ({e})"
        if config_sha256(index.config) != stage.get("config_sha256"):
            return None, f"the checkpoint at {folder} has another config than the export's"
        if not any(t.dtype == _FP8 for t in index.tensors.values()):
            return None, f"the checkpoint at {folder} is not FP8"
        return cls(index), f"fp8 bytes from {folder}"

    def _read(self, ours: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = self.index.names.get(ours)
        if key is None or self.index.tensors[key].dtype != _FP8 or key + SCALE_SUFFIX not in self.index.tensors:
            return None
        tensors = []
        for k in (key, key + SCALE_SUFFIX):
            with safe_open(self.index.folder / self.index.tensors[k].file, framework="pt") as f:
                tensors.append(f.get_tensor(k))
        return tensors[0], tensors[1].float()

    def get(self, name: str, experts: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(fp8, float32 scales) for export weight `name`, stacked over `experts` for a stacked slot."""
        if experts is None:
            return self._read(name)
        prefix, proj = name.split(".experts.", 1)
        parts = [self._read(f"{prefix}.experts.{e}.{proj}") for e in range(experts)]
        if any(p is None for p in parts):
            return None
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])  # type: ignore[index]


def matches(fp8: torch.Tensor, scales: torch.Tensor, exported: torch.Tensor) -> bool:
    """Whether the exported weight is the dequantized checkpoint weight, rounded to some export dtype."""
    assert fp8.dtype == FP8_DTYPE
    if fp8.dim() == 3:
        w = torch.stack([dequantize_block_fp8(fp8[e], scales[e]) for e in range(fp8.shape[0])])
    else:
        w = dequantize_block_fp8(fp8, scales)
    return any(torch.equal(w.to(dtype).float(), exported) for dtype in _ROUNDINGS)


def as_numpy(fp8: torch.Tensor) -> np.ndarray:
    import ml_dtypes

    return fp8.contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
