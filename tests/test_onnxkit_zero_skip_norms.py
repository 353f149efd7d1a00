"""The static decode session's one-row RMSNorms as skip-RMSNorms with a zero skip: which ones, same logits."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from dsv3c.onnxkit.zero_skip_norms import norms_with_zero_skip
from dsv3c.runtime.ort_cuda_graph import StaticDecoder

from .fixtures.exports import lower_ort


@pytest.fixture(scope="module")
def ort_folder(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lower_ort(tiny_export, tmp_path_factory.mktemp("zero-skip") / "ort")


def _norms(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "SimplifiedLayerNormalization"]


def test_every_norm_of_a_fixed_query_length_takes_a_zero_skip(ort_folder: Path) -> None:
    model = onnx.load(ort_folder / "decode.onnx", load_external_data=False)
    layers = sum(i.name.startswith("past_ckv.") for i in model.graph.input)
    norms = len(_norms(model))
    assert norms >= layers + 1  # each latent norm, the first layer's input norm (and q_a norms of a q_lora model)
    assert norms_with_zero_skip(onnx.load(ort_folder / "decode.onnx", load_external_data=False), {}) == 0  # q unknown
    assert norms_with_zero_skip(model, {"batch": 2, "past": 64, "q": 1}) == norms
    assert not _norms(model)
    zeros = {i.name: i for i in model.graph.initializer if i.name.startswith("zero_skip/")}
    assert zeros and all(not any(onnx.numpy_helper.to_array(z).ravel()) for z in zeros.values())
    assert all(z.dims[0] == 1 for z in zeros.values())  # [q, width]: broadcast over the batch


def test_the_decode_steps_compute_the_same(ort_folder: Path) -> None:
    logits = {}
    for rewrite in (True, False):
        decoder = StaticDecoder(ort_folder, 2, 12, device="cpu", cuda_graph=False, threads=1, zero_skip_norms=rewrite)
        assert (decoder.zero_skip_norms > 0) == rewrite
        steps = [decoder.step(torch.tensor([[3 + p], [8 - p]]), torch.tensor([[p], [p]])).clone() for p in range(3)]
        logits[rewrite] = torch.stack(steps)
    want = logits[False]
    assert (logits[True] - want).abs().max() <= 1e-5 * want.abs().max()  # float32 sums in another order
