"""Run an in-memory graph of an export folder with onnxruntime (CPU): calibration, reports, parity tests.

The graph is serialized with its weights still referring to the folder's weights file (onnxruntime reads
them through `session.model_external_initializers_file_folder_path`), so nothing is copied. Inputs are
seeded random values shaped by the manifest's signature: token ids within the vocabulary, positions
that continue a full past, caches and hidden states from N(0, 1). A graph that writes its cache in place
(ort_cache_in_place.py) is run as the exported graph it replaces, so that the two compare by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from dsv3c.artifact.manifest import Manifest
from dsv3c.artifact.names import PRESENT_PREFIXES
from dsv3c.errors import UserError
from dsv3c.onnxkit.session import SessionSetup, open_session


@dataclass(frozen=True)
class FeedShape:
    batch: int = 2
    seq: int = 8  # prefill and MTP tokens
    decode_seq: int = 1
    past: int = 8  # cache entries before the new tokens (decode and MTP)


def random_feeds(
    manifest: Manifest, role: str, rng: np.random.Generator, shape: FeedShape = FeedShape()
) -> dict[str, np.ndarray]:
    """Seeded inputs for the `role` graph, from its signature."""
    sig = manifest.signatures[role]
    has_past = any(t.name.startswith("past_") for t in sig.inputs)
    past = shape.past if has_past else 0
    seq = shape.decode_seq if role == "decode" else shape.seq
    dims = {"batch": shape.batch, "seq": seq, "q": seq, "past": past}
    vocab = int(manifest.config["vocab_size"])
    feeds: dict[str, np.ndarray] = {}
    for t in sig.inputs:
        try:
            size = [d if isinstance(d, int) else dims[d] for d in t.shape]
        except KeyError as e:
            raise UserError(f"{role} input {t.name}: unknown dimension {e}; cannot make random inputs") from None
        if t.name == "positions":
            feeds[t.name] = np.tile(np.arange(past, past + size[1], dtype=np.int64), (size[0], 1))
        elif t.dtype == "int64":
            feeds[t.name] = rng.integers(0, vocab, size=size, dtype=np.int64)
        elif t.dtype == "float32":
            feeds[t.name] = rng.standard_normal(size).astype(np.float32)
        else:
            raise UserError(f"{role} input {t.name} is {t.dtype}; random inputs are made for float32 graphs only")
    return feeds


class GraphRunner:
    """An onnxruntime session for `model`, whose external weights live in `folder`."""

    def __init__(self, model: ir.Model | onnx.ModelProto, folder: Path, extra_outputs: Sequence[str] = ()) -> None:
        proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
        known = {o.name for o in proto.graph.output}
        for name in extra_outputs:
            if name not in known:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
        setup = SessionSetup(weights_folder=folder)  # full optimization, as onnxruntime defaults to
        self.session = open_session(proto.SerializeToString(), setup, what=f"the {proto.graph.name or 'graph'}")
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        """Every output by name; an in-place graph's as the exported graph's: its past inputs get room for
        the step's entries (at positions[b, i], right after a full past), and the slots its present_*
        outputs wrote come back as new_*."""
        if not any(n.startswith(PRESENT_PREFIXES) for n in self.output_names):
            return self.run_as_is(feeds)
        past = next((v.shape[1] for n, v in feeds.items() if n.startswith("past_")), 0)
        seq = feeds["positions"].shape[1]
        room = {n: np.pad(v, ((0, 0), (0, seq), (0, 0))) if n.startswith("past_") else v for n, v in feeds.items()}
        out = self.run_as_is(room)
        written = {n: v for n, v in out.items() if n.startswith(PRESENT_PREFIXES)}
        new = {"new_" + n.removeprefix("present_"): v[:, past : past + seq] for n, v in written.items()}
        return {**{n: v for n, v in out.items() if n not in written}, **new}

    def run_as_is(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        return dict(zip(self.output_names, self.session.run(None, feeds), strict=True))


def load_graph(folder: Path, role: str) -> ir.Model:
    return ir.load(folder / f"{role}.onnx")


def relative_error(a: np.ndarray, ref: np.ndarray) -> float:
    """||a - ref|| / ||ref|| (Frobenius), in float64."""
    a64, r64 = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    denom = float(np.linalg.norm(r64))
    return float(np.linalg.norm(a64 - r64)) / denom if denom else float(np.linalg.norm(a64))
