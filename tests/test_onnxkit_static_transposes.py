"""The static decode session's Transposes of size-1 dimensions as Reshapes: which ones, and the same logits."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from dsv3c.onnxkit.static_transposes import transposes_as_reshapes
from dsv3c.runtime.ort_cuda_graph import StaticDecoder

from .fixtures.exports import lower_ort


@pytest.fixture(scope="module")
def ort_folder(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lower_ort(tiny_export, tmp_path_factory.mktemp("static-transposes") / "ort")


def test_only_the_transposes_of_one_query_become_reshapes(ort_folder: Path) -> None:
    model = onnx.load(ort_folder / "decode.onnx", load_external_data=False)
    layers = sum(i.name.startswith("past_ckv.") for i in model.graph.input)
    transposes = sum(n.op_type == "Transpose" for n in model.graph.node)
    assert transposes_as_reshapes(onnx.load(ort_folder / "decode.onnx", load_external_data=False), {}) == 0
    assert transposes_as_reshapes(model, {"batch": 2, "past": 64, "q": 1}) == 3 * layers  # q_nope, q_pe, output
    kept = [n for n in model.graph.node if n.op_type == "Transpose"]
    assert len(kept) == transposes - 3 * layers and all(n.input[0].startswith("present_") for n in kept)  # the cache's


def test_the_decode_steps_are_the_same_bits(ort_folder: Path) -> None:
    logits = {}
    for reshape in (True, False):
        decoder = StaticDecoder(
            ort_folder, 2, 12, device="cpu", cuda_graph=False, threads=1, reshape_transposes=reshape
        )
        assert (decoder.reshaped_transposes > 0) == reshape
        steps = [decoder.step(torch.tensor([[3 + p], [8 - p]]), torch.tensor([[p], [p]])).clone() for p in range(3)]
        logits[reshape] = torch.stack(steps)
    assert torch.equal(logits[True], logits[False])
