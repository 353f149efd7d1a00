"""`lower --target ort --decode-cache apart`: decode attention reads the past cache and the new entries apart
(no Concat of the cache) and computes what the canonical graph computes; `--decode-cache concat` keeps the
exported form. (The default, in place: test_passes_ort_cache_in_place.py.)

bench/attention_past_apart.py measures the forms side by side per context.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest
import torch
from dsv3c.cli import main as cli
from dsv3c.passes.pipelines import DecodeCache
from dsv3c.runtime.ort_backend import OrtEngine
from dsv3c.runtime.ort_cuda_graph import StaticDecoder

from .fixtures.exports import lower_ort


@pytest.fixture(scope="module")
def lowerings(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("past-apart")
    return {name: lower_ort(tiny_export, root / name, decode_cache=DecodeCache(name)) for name in ("concat", "apart")}


def _cache_concats(graph: ir.Graph) -> int:
    """Concats that read a past cache input (past_ckv.N / past_kpe.N)."""
    return sum(
        1
        for n in graph
        if n.op_type == "Concat" and any(v is not None and (v.name or "").startswith("past_") for v in n.inputs)
    )


def test_decode_reads_the_past_cache_without_copying_it(lowerings: dict[str, Path]) -> None:
    concat, apart = (ir.load(lowerings[n] / "decode.onnx").graph for n in ("concat", "apart"))
    layers = sum(1 for v in concat.inputs if (v.name or "").startswith("past_ckv."))
    assert layers > 0 and _cache_concats(concat) == 2 * layers
    assert _cache_concats(apart) == 0
    mtp = ir.load(lowerings["apart"] / "mtp.onnx").graph  # the MTP module attends over its own cache alike
    assert _cache_concats(ir.load(lowerings["concat"] / "mtp.onnx").graph) == 2 and _cache_concats(mtp) == 0
    for graph in (concat, apart):  # past_ckv.N is read by the attention's GEMMs straight from the bound buffer
        assert all(
            u.node.op_type in ("Concat", "MatMul", "Transpose", "Shape")
            for v in graph.inputs
            if (v.name or "").startswith("past_")
            for u in v.uses()
        )


def test_both_forms_compute_the_canonical_decode(tiny_export: Path, lowerings: dict[str, Path]) -> None:
    ids, positions = torch.tensor([[3, 7, 1, 9, 4, 2]]), torch.arange(6)[None]
    engines = {"canonical": OrtEngine(tiny_export), **{n: OrtEngine(f) for n, f in lowerings.items()}}
    for engine in engines.values():
        engine.start(1, 16)
        engine.prefill(ids, positions)
    for step in range(3):
        token, position = torch.tensor([[5 + step]]), torch.tensor([[6 + step]])
        out = {n: e.decode(token, position).logits for n, e in engines.items()}
        want = out["canonical"]
        for name in lowerings:
            assert (out[name] - want).abs().max() <= 1e-5 * want.abs().max(), name


def test_static_decoder_over_a_full_capacity_cache(lowerings: dict[str, Path]) -> None:
    """The static step attends over every slot of the bound buffer, masking those beyond the position."""
    steps = {}
    for name, folder in lowerings.items():
        decoder = StaticDecoder(folder, 2, 12, device="cpu", cuda_graph=False, threads=1)
        logits = []
        for p in range(4):
            out = decoder.step(torch.tensor([[3 + p], [8 - p]]), torch.tensor([[p], [p]]))
            logits.append(out.clone())
        steps[name] = torch.stack(logits)
    a, b = steps["concat"], steps["apart"]
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_decode_cache_is_for_the_ort_target(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    lower = ["lower", str(tiny_export), "--target", "portable", "--decode-cache", "concat"]
    code = cli.main([*lower, "--out", str(tmp_path / "p")])
    assert code == 2 and "--decode-cache" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert not (tmp_path / "p").exists()


def test_an_empty_past_gives_the_same_step(lowerings: dict[str, Path]) -> None:
    """A decode step over a past of length 0: the GEMMs over the past are empty, the result the same."""
    import numpy as np
    import onnxruntime as ort

    logits = {}
    for name, folder in lowerings.items():
        session = ort.InferenceSession(str(folder / "decode.onnx"), providers=["CPUExecutionProvider"])
        feeds = {}
        for i in session.get_inputs():
            if i.name in ("input_ids", "positions"):
                feeds[i.name] = np.array([[5 if i.name == "input_ids" else 0]], dtype=np.int64)
            else:  # past_ckv.N / past_kpe.N [batch, 0, width]
                feeds[i.name] = np.zeros((1, 0, int(i.shape[2])), dtype=np.float32)
        logits[name] = session.run(["logits"], feeds)[0]
    a, b = logits["concat"], logits["apart"]
    assert np.isfinite(b).all() and np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
