"""Small export folders for the passes' tests and demos, and a PyTorch model built from an export's weights.

`mini_export(root)` exports (once per process and root) a 2-layer variant of the tiny preset (one dense
layer, one MoE layer, MTP) from a random FP8 checkpoint: tracing dominates, so tests share it.
`weightless_copy` gives the same graphs as `--weights none`; `edit_weights` rewrites weights (e.g. off the
fp8 grid, or with outlier channels) into a new folder.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from dsv3c.artifact.export_folder import read_export, write_export
from dsv3c.artifact.manifest import read_manifest, write_manifest
from dsv3c.models.checkpoint_layout import CheckpointDtype
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM

MINI_LAYERS = 2


def mini_config(**overrides: object) -> DeepseekV3Config:
    d = DeepseekV3Config.from_preset("tiny").to_dict()
    d["num_hidden_layers"] = MINI_LAYERS
    d.update(overrides)
    return DeepseekV3Config.from_dict(d)


@functools.cache
def mini_export(root: Path, dtype: CheckpointDtype = "fp8", **overrides: object) -> Path:
    """root/export-{dtype}: the mini model exported from a random `dtype` checkpoint (seed 0)."""
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder
    from dsv3c.models.checkpoint import init_random, save_model

    tag = dtype + "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
    ckpt, out = root / f"ckpt-{tag}", root / f"export-{tag}"
    save_model(init_random(mini_config(**overrides), seed=0), ckpt, dtype=dtype)
    export(from_folder(ckpt), out, weights="checkpoint", fp8="dequantize")  # float weights on the fp8 grid
    return out


def weightless_copy(src: Path, out: Path) -> Path:
    """The graphs of `src` with the manifest saying `weights: none` and no weights file."""
    out.mkdir(parents=True)
    manifest = read_manifest(src)
    for file in manifest.graphs.values():
        if file is not None:
            shutil.copy(src / file, out / file)
    manifest.weights = "none"
    write_manifest(manifest, out)
    return out


def edit_weights(src: Path, out: Path, edit: Callable[[str, np.ndarray], np.ndarray | None]) -> Path:
    """Copy the export `src` to `out` with weights replaced where `edit(name, array)` returns an array."""
    graphs = read_export(src)
    done: dict[str, np.ndarray | None] = {}
    for model in graphs.models.values():
        for name, value in model.graph.initializers.items():
            if not isinstance(value.const_value, ir.ExternalTensor):
                continue
            if name not in done:
                done[name] = edit(name, np.array(value.const_value.numpy()))
            new = done[name]
            if new is not None:
                value.const_value = ir.tensor(new.astype(value.const_value.dtype.numpy()), name=name)
    write_export(graphs, out, {"stage": "edit-weights"})
    return out


def torch_model_from_export(folder: Path) -> DeepseekV3ForCausalLM:
    """The PyTorch model holding an export's (float) weights: stacked experts split, names as in the model."""
    graphs = read_export(folder)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(graphs.manifest.config)).eval()
    params = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for m in graphs.models.values():
        for name, value in m.graph.initializers.items():
            if not isinstance(value.const_value, ir.ExternalTensor) or name in state:
                continue
            tensor = torch.from_numpy(np.array(value.const_value.numpy(), dtype=np.float32))
            if name in params:
                state[name] = tensor
            elif ".experts." in name:  # stacked [E, out, in] -> experts.{e}.{proj}.weight
                prefix, proj = name.split(".experts.")
                for e in range(tensor.shape[0]):
                    state[f"{prefix}.experts.{e}.{proj}"] = tensor[e]
    missing = set(params) - set(state)
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise RuntimeError(f"bug: the export lacks {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    return model
