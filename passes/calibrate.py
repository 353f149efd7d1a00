"""Static activation scales: run N seeded random batches through the unquantized graphs, record amax.

For every MatMul linear named in `linears`, the largest |x| of its input over all batches and all graphs
(prefill, decode and MTP run the same layers, so one scale per linear serves every graph). The scale the
graph uses is derived from it by the activation pass (amax / 448, or its power of two).
"""

from __future__ import annotations

import numpy as np
from dsv3c.artifact.export_folder import ExportGraphs
from dsv3c.errors import UserError
from dsv3c.passes.linears import LinearKind, find_linears
from dsv3c.passes.ort_run import FeedShape, GraphRunner, random_feeds


def calibrate(
    graphs: ExportGraphs, linears: set[str], batches: int, seed: int = 0, shape: FeedShape | None = None
) -> dict[str, float]:
    """{weight name: activation amax} for the MatMul linears in `linears`."""
    if batches < 1:
        raise UserError(f"--calibrate needs at least 1 batch, got {batches}")
    if not graphs.has_weights:
        raise UserError(f"{graphs.folder}: calibration runs the model, but this export has no weights (--weights none)")
    amax: dict[str, float] = {}
    rng = np.random.default_rng(seed)
    for role, model in graphs.models.items():
        inputs: dict[str, list[str]] = {}  # activation tensor -> linears reading it
        for linear in find_linears(model.graph):
            if linear.kind == LinearKind.MATMUL and linear.name in linears:
                assert linear.activation is not None and linear.activation.name is not None
                inputs.setdefault(linear.activation.name, []).append(linear.name)
        if not inputs:
            continue
        runner = GraphRunner(model, graphs.folder, extra_outputs=list(inputs))
        for _ in range(batches):
            outputs = runner.run(random_feeds(graphs.manifest, role, rng, shape or FeedShape()))
            for tensor, names in inputs.items():
                value = float(np.abs(outputs[tensor]).max())
                for name in names:
                    amax[name] = max(amax.get(name, 0.0), value)
    return amax
