"""What the GPU benchmarks share: the one-line refusal without a CUDA device, and weightless folders filled
with random weights on the GPU (runtime/random_weights.py) before they are measured."""

from __future__ import annotations

import sys
from pathlib import Path


def no_cuda(script: str) -> bool:
    """True (after saying so on stderr) when torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return False
    print(f"{script}: error: torch sees no CUDA device; run this on the GPU machine", file=sys.stderr)
    return True


def fill_if_weightless(folder: Path, seed: int = 0) -> int | None:
    """Bytes of random weights written into a `--weights none` folder; None when it has weights already."""
    from dsv3c.artifact.manifest import read_manifest
    from dsv3c.runtime.random_weights import fill_random

    if read_manifest(folder).weights != "none":
        return None
    return fill_random(folder, seed=seed, device="cuda")
