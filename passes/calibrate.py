"""Static activation scales: run N batches through the unquantized graphs, record amax per linear input.

For every MatMul linear named in `linears`, the largest |x| of its input over all batches and all graphs
(prefill, decode and MTP run the same layers, so one scale per linear serves every graph). The scale the
graph uses is derived from it by the activation pass (amax / 448, or its power of two).

The batches come from text when the caller gives token windows (as users calibrate: real activations,
whose outliers random ids do not produce), else from seeded random inputs. With text, each graph sees
what it sees when generating: prefill the window but its last token; decode that token over the
prefill's latent cache; MTP the window shifted by one over the prefill's hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from dsv3c.artifact.export_folder import ExportGraphs
from dsv3c.artifact.manifest import Manifest
from dsv3c.errors import UserError
from dsv3c.onnxkit.linears import LinearKind, rewritable_linears
from dsv3c.passes.ort_run import FeedShape, GraphRunner, random_feeds

ROLE_ORDER = ("prefill", "decode", "mtp")  # text feeds for decode and MTP come from prefill's outputs


def calibrate(
    graphs: ExportGraphs,
    linears: set[str],
    batches: int,
    seed: int = 0,
    shape: FeedShape | None = None,
    text: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """{weight name: activation amax} for the MatMul linears in `linears`; `text`: token windows
    [B, S] per batch (S >= 3), the first `batches` of them."""
    if batches < 1:
        raise UserError(f"--calibrate needs at least 1 batch, got {batches}")
    if not graphs.has_weights:
        raise UserError(f"{graphs.folder}: calibration runs the model, but this export has no weights (--weights none)")
    if text is not None:
        text = list(text)[:batches]
        if not text:
            raise UserError("--calibration-data gave no batch of tokens")
        if min(w.shape[1] for w in text) < 3:
            raise UserError("calibration windows need at least 3 tokens")
    runners: dict[str, tuple[GraphRunner, dict[str, list[str]]]] = {}
    for role in sorted(graphs.models, key=lambda r: ROLE_ORDER.index(r) if r in ROLE_ORDER else len(ROLE_ORDER)):
        inputs: dict[str, list[str]] = {}  # activation tensor -> linears reading it
        for linear in rewritable_linears(graphs.models[role].graph):
            if linear.kind == LinearKind.MATMUL and linear.name in linears:
                assert linear.activation is not None and linear.activation.name is not None
                inputs.setdefault(linear.activation.name, []).append(linear.name)
        if inputs or (text is not None and role == "prefill"):
            runners[role] = (GraphRunner(graphs.models[role], graphs.folder, extra_outputs=list(inputs)), inputs)
    amax: dict[str, float] = {}
    rng = np.random.default_rng(seed)
    count = len(text) if text is not None else batches
    for b in range(count):
        prefill_out: dict[str, np.ndarray] = {}
        for role, (runner, inputs) in runners.items():
            if text is None:
                feeds = random_feeds(graphs.manifest, role, rng, shape or FeedShape())
            else:
                feeds = text_feeds(graphs.manifest, role, text[b], prefill_out)
            outputs = runner.run(feeds)
            if role == "prefill":
                prefill_out = outputs
            for tensor, names in inputs.items():
                value = float(np.abs(outputs[tensor]).max())
                for name in names:
                    amax[name] = max(amax.get(name, 0.0), value)
    return amax


def calibration_record(batches: int, seed: int, text: Sequence[np.ndarray] | None) -> dict[str, object]:
    """What the manifest says about the calibration batches: from text (how much) or random ids (seed)."""
    if text is None:
        return {"source": "random ids", "batches": batches, "seed": seed}
    used = list(text)[:batches]
    return {
        "source": "text",
        "batches": len(used),
        "tokens": int(sum(w.size for w in used)),
        "window": int(used[0].shape[1]) if used else 0,
    }


def text_feeds(manifest: Manifest, role: str, ids: np.ndarray, prefill: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs of `role` for token windows ids [B, S] (decode and MTP read prefill's outputs)."""
    batch, seq = ids.shape
    head, last = ids[:, :-1], ids[:, -1:]  # prefill reads S - 1 tokens; decode the last one
    positions = np.tile(np.arange(seq - 1, dtype=np.int64), (batch, 1))
    feeds: dict[str, np.ndarray] = {}
    for t in manifest.signatures[role].inputs:
        if t.dtype not in ("int64", "float32"):
            raise UserError(f"{role} input {t.name} is {t.dtype}; calibration runs float32 exports only")
        if role == "prefill":
            feeds[t.name] = {"input_ids": head, "positions": positions}[t.name]
        elif role == "decode" and t.name in ("input_ids", "positions"):
            feeds[t.name] = last if t.name == "input_ids" else np.full((batch, 1), seq - 1, dtype=np.int64)
        elif role == "decode" and t.name.startswith("past_"):
            feeds[t.name] = prefill["new_" + t.name[len("past_") :]]
        elif t.name == "next_ids":
            feeds[t.name] = ids[:, 1:]
        elif t.name == "positions":
            feeds[t.name] = positions
        elif t.name.startswith("hidden"):
            feeds[t.name] = next(v for k, v in prefill.items() if k.startswith("hidden"))
        elif t.name.startswith("past_"):  # the MTP module's own cache starts empty
            width = t.shape[-1]
            assert isinstance(width, int)
            feeds[t.name] = np.zeros((batch, 0, width), dtype=np.float32)
        else:
            raise UserError(f"{role} input {t.name}: calibration from text does not know how to feed it")
    return feeds
