"""`lower --target ort` (`--decode-cache in-place`, the default): decode and MTP graphs write their new cache
entries into the bound past buffer and attend over it; the runtimes bind the present outputs onto the past
buffers, and every step computes what the canonical graph computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from dsv3c.artifact.manifest import IN_PLACE_RULE, read_manifest
from dsv3c.onnxkit.session import SessionSetup, open_session
from dsv3c.passes.lower import lower_folder
from dsv3c.passes.pipelines import DecodeCache, Target
from dsv3c.runtime.engine import EngineBackend
from dsv3c.runtime.generate import generate
from dsv3c.runtime.ort_backend import OrtEngine
from dsv3c.runtime.ort_cuda_graph import StaticDecoder
from dsv3c.runtime.speculative import generate_mtp

from .fixtures.exports import lower_ort

PROMPTS = [[5, 17, 301, 42, 9, 77, 120], [3, 4], [250, 251, 252, 253]]


@pytest.fixture(scope="module")
def lowerings(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("in-place")
    return {name: lower_ort(tiny_export, root / name, decode_cache=DecodeCache(name)) for name in ("apart", "in-place")}


def test_the_graphs_write_the_cache_and_read_it_once(lowerings: dict[str, Path]) -> None:
    manifest = json.loads((lowerings["in-place"] / "manifest.json").read_text())
    assert manifest["cache"]["append_rule"] == IN_PLACE_RULE
    for role, layers in (("decode", manifest["cache"]["layers"]), ("mtp", 1)):
        graph = ir.load(lowerings["in-place"] / f"{role}.onnx").graph
        outputs = [v.name or "" for v in graph.outputs]
        assert not any(n.startswith("new_") for n in outputs)
        assert sum(n.startswith(("present_ckv.", "present_kpe.")) for n in outputs) == 2 * layers
        writes = [n for n in graph if n.op_type == "ScatterElements" and n.inputs[0] in graph.inputs]
        assert len(writes) == 2 * layers and all(n.outputs[0] in graph.outputs for n in writes)
        for v in graph.inputs:  # a past buffer is read by its write alone; attention reads what it wrote
            if (v.name or "").startswith("past_"):
                assert [u.node.op_type for u in v.uses() if u.node.op_type != "Shape"] == ["ScatterElements"]
    apart = ir.load(lowerings["apart"] / "decode.onnx").graph
    graph = ir.load(lowerings["in-place"] / "decode.onnx").graph
    assert len(graph) < len(apart)
    assert sum(n.op_type == "Split" for n in graph) < sum(n.op_type == "Split" for n in apart)  # no score Split


@pytest.mark.parametrize("batch", [1, 2])
def test_steps_compute_the_canonical_decode(tiny_export: Path, lowerings: dict[str, Path], batch: int) -> None:
    """Prefill, then decode steps of one to three tokens per row (as MTP verification runs them): the logits
    and the cache the runtime holds afterwards equal the canonical graph's."""
    engines = {"canonical": OrtEngine(tiny_export), **{n: OrtEngine(f) for n, f in lowerings.items()}}
    ids, positions = torch.tensor([[3, 7, 1, 9, 4, 2]] * batch), torch.arange(6)[None].repeat(batch, 1)
    for engine in engines.values():
        engine.start(batch, 16)
        engine.prefill(ids, positions)
    generator = torch.Generator().manual_seed(0)
    start = 6
    for q in (1, 3, 2):
        tokens = torch.randint(0, 300, (batch, q), generator=generator)
        at = (start + torch.arange(q))[None].repeat(batch, 1)
        out = {n: e.decode(tokens, at).logits for n, e in engines.items()}
        want = out["canonical"]
        for name in lowerings:
            assert (out[name] - want).abs().max() <= 1e-5 * want.abs().max(), (name, q)
        start += q
    want_cache = engines["canonical"].cache
    assert want_cache is not None
    for name in lowerings:
        cache = engines[name].cache
        assert cache is not None
        for got, ref in zip([*cache.ckv, *cache.kpe], [*want_cache.ckv, *want_cache.kpe], strict=True):
            assert (got[:, :start] - ref[:, :start]).abs().max() <= 1e-5 * ref.abs().max()


def test_static_decoder_writes_the_bound_buffers(lowerings: dict[str, Path]) -> None:
    steps, caches = {}, {}
    for name, folder in lowerings.items():
        decoder = StaticDecoder(folder, 2, 12, device="cpu", cuda_graph=False, threads=1)
        logits = [decoder.step(torch.tensor([[3 + p], [8 - p]]), torch.tensor([[p], [p]])).clone() for p in range(4)]
        steps[name], caches[name] = torch.stack(logits), decoder.cache.ckv_layers.clone()
    a, b = steps["apart"], steps["in-place"]
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert caches["in-place"][:, :, :4].abs().max() > 0 and not caches["in-place"][:, :, 4:].any()
    assert (caches["in-place"] - caches["apart"]).abs().max() <= 1e-5 * caches["apart"].abs().max()


def test_mtp_speculation_gives_the_greedy_output(lowerings: dict[str, Path]) -> None:
    greedy = generate(EngineBackend(OrtEngine(lowerings["apart"])), PROMPTS, 16)
    tokens, stats = generate_mtp(OrtEngine(lowerings["in-place"]), PROMPTS, 16)
    assert tokens == greedy and stats.drafted > 0


def test_unbound_it_returns_the_written_cache(lowerings: dict[str, Path]) -> None:
    """Run as a plain session, the step returns the whole past with slot positions[b, 0] written."""
    session = open_session(lowerings["in-place"] / "decode.onnx", SessionSetup(threads=1), what="decode")
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {"input_ids": np.array([[5], [9]]), "positions": np.array([[3], [5]])}
    for t in session.get_inputs():
        if t.name.startswith("past_"):
            width = int(t.shape[2])
            feeds[t.name] = rng.standard_normal((2, 8, width)).astype(np.float32)
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    for name, value in feeds.items():
        if name.startswith("past_"):
            present = out["present_" + name.removeprefix("past_")]
            changed = np.flatnonzero((present != value).any(axis=2).reshape(-1))
            assert changed.tolist() == [3, 8 + 5]  # row 0 slot 3, row 1 slot 5: nothing else


def test_error_vs_source_reads_what_it_wrote(tiny_export: Path, tmp_path: Path) -> None:
    """An 8-bit lowering measures its error against the source; in place, the written slots stand for new_*:
    the same outputs, and the same errors as the default attention's (8-bit rounding dominates both)."""
    errors = {}
    for name, cache in (("apart", DecodeCache.APART), ("in-place", DecodeCache.IN_PLACE)):
        lower_folder(tiny_export, tmp_path / name, Target.ORT, weights_8bit=32, decode_cache=cache)
        errors[name] = read_manifest(tmp_path / name).stages[-1]["error_vs_source"]["outputs"]
    assert errors["in-place"].keys() == errors["apart"].keys()
    for role, outputs in errors["apart"].items():
        assert outputs.keys() == errors["in-place"][role].keys() and "new_ckv.0" in outputs
        for output, error in outputs.items():
            assert errors["in-place"][role][output] == pytest.approx(error, rel=1e-3, abs=1e-6), (role, output)


def test_the_softmax_scale_goes_into_the_score_gemms(lowerings: dict[str, Path], tmp_path: Path) -> None:
    """Each score GEMM carries the scale itself, so onnxruntime folds it into the GEMM (FusedMatMul's alpha):
    after its optimizations no Mul of a decode step reads a score GEMM or the scores' sum."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3  # the warning that an optimized file is machine-specific
    ort.InferenceSession(str(lowerings["in-place"] / "decode.onnx"), options, providers=["CPUExecutionProvider"])
    graph = ir.load(tmp_path / "optimized.onnx").graph
    layers = read_manifest(lowerings["in-place"]).cache.layers
    scaled = [n for n in graph if n.op_type == "FusedMatMul" and "alpha" in n.attributes]
    assert len(scaled) == 2 * layers
    alphas = {round(n.attributes["alpha"].as_float(), 6) for n in scaled}
    assert len(alphas) == 1 and 0 < alphas.pop() < 1
    for add in (u.node for n in scaled for u in n.outputs[0].uses()):
        assert add.op_type == "Add" and all(u.node.op_type != "Mul" for u in add.outputs[0].uses())
