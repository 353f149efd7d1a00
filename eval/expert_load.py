"""Expert load observed on held-out text: tokens routed to each expert, per MoE layer, max/mean.

Counted twice, independently: from the PyTorch model (a hook on each router's selection) and from the
exported graph (the canonical export lowered to portable ONNX, whose inlined MoE bodies expose the
routing TopK; its expert indices are made graph outputs and counted). Both see the same windows, so
the counts must agree exactly, unless a routing score ties within rounding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from dsv3c.errors import UserError


@dataclass
class LayerLoad:
    layer: int
    counts: list[int]  # tokens per routed expert (each token counted once per expert it visits)

    @property
    def max_over_mean(self) -> float:
        c = np.asarray(self.counts, dtype=np.float64)
        return float(c.max() / c.mean()) if c.sum() else 0.0

    def to_dict(self) -> dict[str, object]:
        return {"layer": self.layer, "max_over_mean": self.max_over_mean, "counts": self.counts}


def torch_loads(checkpoint: Path, windows: np.ndarray, batch: int = 4) -> list[LayerLoad]:
    from dsv3c.models.checkpoint import load_model
    from dsv3c.models.deepseek_v3 import MoE

    model = load_model(checkpoint).eval()
    counts: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, MoE):
            n = len(layer.mlp.experts)
            counts[i] = torch.zeros(n, dtype=torch.long)

            def hook(
                _m: torch.nn.Module, _in: object, out: tuple[torch.Tensor, torch.Tensor], i: int = i, n: int = n
            ) -> None:
                counts[i] += torch.bincount(out[1].flatten(), minlength=n)

            hooks.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch):
                ids = torch.from_numpy(windows[start : start + batch])
                model(ids, positions=torch.arange(ids.shape[1]).expand_as(ids))
    finally:
        for h in hooks:
            h.remove()
    return [LayerLoad(i, c.tolist()) for i, c in sorted(counts.items())]


def routing_outputs(model: ir.Model) -> dict[str, int]:
    """{expert-index value name: layer} for each routing TopK of an inlined graph: the TopK whose
    indices feed the GatherElements of the mixing weights (group selection feeds a scatter instead)."""
    found: dict[str, int] = {}
    for node in model.graph:
        if node.op_type != "TopK":
            continue
        indices = node.outputs[1]
        if not any(use.node.op_type == "GatherElements" for use in indices.uses()):
            continue
        match = re.search(r"layers\.(\d+)", node.name or "")
        if match is None or indices.name is None:
            raise UserError(f"routing TopK {node.name!r} does not name its layer; cannot attribute its load")
        found[indices.name] = int(match.group(1))
    return found


def graph_loads(export: Path, work: Path, windows: np.ndarray, n_experts: int, batch: int = 4) -> list[LayerLoad]:
    from dsv3c.artifact.export_folder import read_export
    from dsv3c.passes.lower import lower_folder
    from dsv3c.passes.ort_run import GraphRunner
    from dsv3c.passes.pipelines import Target

    portable = work / "portable"
    if not (portable / "manifest.json").is_file():
        lower_folder(export, portable, Target.PORTABLE, force=True)
    graphs = read_export(portable)
    outputs = routing_outputs(graphs.models["prefill"])
    if not outputs:
        raise UserError(f"{export}: no routing TopK found in the inlined prefill graph")
    runner = GraphRunner(graphs.models["prefill"], portable, extra_outputs=list(outputs))
    counts = {layer: np.zeros(n_experts, dtype=np.int64) for layer in outputs.values()}
    for start in range(0, len(windows), batch):
        ids = windows[start : start + batch]
        positions = np.tile(np.arange(ids.shape[1], dtype=np.int64), (ids.shape[0], 1))
        out = runner.run({"input_ids": ids, "positions": positions})
        for name, layer in outputs.items():
            counts[layer] += np.bincount(out[name].reshape(-1), minlength=n_experts)
    return [LayerLoad(layer, c.tolist()) for layer, c in sorted(counts.items())]


def format_loads(title: str, loads: list[LayerLoad], width: int = 40) -> str:
    """One line per layer with max/mean, then a bar per expert (its share of the mean load)."""
    lines = [title]
    for load in loads:
        c = np.asarray(load.counts, dtype=np.float64)
        lines.append(f"  layer {load.layer}: max/mean {load.max_over_mean:.3f}")
        for e, n in enumerate(c):
            bar = "#" * round(width * n / c.max()) if c.max() else ""
            lines.append(f"    expert {e:3d} {n / c.mean():5.2f}x {bar}")
    return "\n".join(lines)
