"""Shared by the export tests: one tiny checkpoint exported once per test session, and ORT helpers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from dsv3c.artifact.manifest import Manifest
from dsv3c.export.exporter import export
from dsv3c.export.source import from_folder
from dsv3c.models.checkpoint import save_model
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM

from .conftest import random_model


@dataclass
class Exported:
    model: DeepseekV3ForCausalLM  # the PyTorch reference, same weights as the checkpoint
    checkpoint: Path
    out: Path
    manifest: Manifest

    def session(self, role: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(self.manifest.graph_path(role)), providers=["CPUExecutionProvider"])


_CACHE: dict[str, Exported] = {}


def exported_tiny(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The tiny preset with decisive random weights, saved as an fp32 checkpoint and exported from it."""
    if "tiny" not in _CACHE:
        root = tmp_path_factory.mktemp("export")
        model = random_model(DeepseekV3Config.from_preset("tiny"))
        save_model(model, root / "ckpt", dtype="fp32")
        manifest = export(from_folder(root / "ckpt"), root / "out", weights="checkpoint")
        _CACHE["tiny"] = Exported(model, root / "ckpt", root / "out", manifest)
    return _CACHE["tiny"]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())
