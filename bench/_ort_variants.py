"""The benchmarks' side-by-side setup: a preset exported without weights, lowered for ort once per variant
(lower_folder's options), each lowering filled with the same random weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from dsv3c.cli.main import main as dsv3c_main
from dsv3c.passes.lower import lower_folder
from dsv3c.passes.pipelines import Target
from dsv3c.runtime.random_weights import fill_random


def ort_variants(preset: str, work: Path, variants: dict[str, dict[str, Any]], device: str) -> dict[str, Path] | None:
    """{name: work/ort-<name>}, the canonical export in work/canon; None when the export failed (it said why)."""
    work.mkdir(parents=True, exist_ok=True)
    canon = work / "canon"
    if dsv3c_main(["export", "--preset", preset, "--weights", "none", "--out", str(canon), "--force"]):
        return None
    folders = {}
    for name, options in variants.items():
        folders[name] = work / f"ort-{name}"
        lower_folder(canon, folders[name], Target.ORT, force=True, **options)
        fill_random(folders[name], device=device)  # drawn on the GPU there (faster)
    return folders


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|: how far two lowerings' logits are apart."""
    return float((a - b).abs().max() / a.abs().max())
