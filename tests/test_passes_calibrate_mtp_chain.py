"""Calibration from text runs the MTP chain as generation does: module d reads module d-1's hidden output
and token t+1+d (DeepSeek-V3's sequential MTP), so the activations it records for MTP module 1 are those
of the PyTorch reference chain over the same window (a model with 2 MTP modules, random weights); the
earlier feeds (prefill's hidden state and tokens t+1 for every module) were off by up to 24% there (median 10%)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from dsv3c.artifact.export_folder import ExportGraphs, read_export
from dsv3c.errors import UserError
from dsv3c.models.checkpoint import load_model
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3c.onnxkit.linears import LinearKind, rewritable_linears
from dsv3c.passes.calibrate import calibrate, chain_order, min_window, text_feeds

from .conftest import random_model
from .fixtures.exports import mini_config
from .fixtures.threads import one_thread  # noqa: F401  (autouse: this module runs torch on one thread)

SEQ = 10  # tokens per window: prefill and module 0 read 9 slots, module 1 reads 8
RTOL = 1e-4  # onnxruntime float32 (absorbed MLA) against PyTorch float32: amax agree to 3.4e-7 here


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[DeepseekV3ForCausalLM, ExportGraphs]:
    """The tiny preset cut to one (dense) layer, with two (MoE) MTP modules, random weights; and its export."""
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder
    from dsv3c.models.checkpoint import save_model

    root = tmp_path_factory.mktemp("calibrate-mtp-chain")
    save_model(random_model(mini_config(num_hidden_layers=1, num_nextn_predict_layers=2), seed=3), root / "checkpoint")
    export(from_folder(root / "checkpoint"), root / "export", weights="checkpoint")
    return load_model(root / "checkpoint"), read_export(root / "export")


def windows() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(2, 512, size=(2, SEQ), dtype=np.int64) for _ in range(2)]


def matmuls(graphs: ExportGraphs, role: str) -> set[str]:
    return {lin.name for lin in rewritable_linears(graphs.models[role].graph) if lin.kind == LinearKind.MATMUL}


def reference_amax(model: DeepseekV3ForCausalLM, batches: list[np.ndarray], depth: int) -> dict[str, float]:
    """max |input| of MTP module `depth`'s linears over the reference chain run on each window: the main
    model on tokens 0 .. S-2, then module d on module d-1's states at slots 0 .. S-2-d and tokens t+1+d."""
    amax: dict[str, float] = {}
    module = model.mtp[depth]

    def recorder(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            amax[name] = max(amax.get(name, 0.0), float(args[0].abs().max()))

        return hook

    handles = [
        m.register_forward_pre_hook(recorder(f"mtp.{depth}.{n}.weight"))
        for n, m in module.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        with torch.no_grad():
            for ids in map(torch.from_numpy, batches):
                state = model(ids[:, :-1]).hidden_states  # [B, S-1, D]
                for d in range(depth + 1):
                    slots = SEQ - 1 - d
                    _, state, _ = model.forward_mtp(ids[:, 1 + d :], state[:, :slots], depth=d, path="absorbed")
    finally:
        for h in handles:
            h.remove()
    return amax


@pytest.mark.parametrize("role,depth", [("mtp", 0), ("mtp.1", 1)])
def test_mtp_activations_are_the_reference_chains(
    chain: tuple[DeepseekV3ForCausalLM, ExportGraphs], role: str, depth: int
) -> None:
    model, graphs = chain
    linears = matmuls(graphs, role)
    got = calibrate(graphs, linears, 2, text=windows())
    want = reference_amax(model, windows(), depth)
    assert len(got) == len(linears) >= 9  # eh_proj, attention, shared experts, the head
    assert set(got) <= set(want)
    for name, value in got.items():
        assert value == pytest.approx(want[name], rel=RTOL), name


def test_module_1_reads_module_0s_state(chain: tuple[DeepseekV3ForCausalLM, ExportGraphs]) -> None:
    """mtp.1's feeds: module 0's hidden_out (here the reference's) trimmed to S-2 slots, tokens 2 .. S-1."""
    model, graphs = chain
    ids = windows()[0]
    with torch.no_grad():
        hidden = model(torch.from_numpy(ids[:, :-1])).hidden_states
        _, state, _ = model.forward_mtp(torch.from_numpy(ids[:, 1:]), hidden, depth=0)
    feeds = text_feeds(graphs.manifest, "mtp.1", ids, {"hidden_out": state.numpy()})
    np.testing.assert_array_equal(feeds["hidden"], state.numpy()[:, : SEQ - 2])
    np.testing.assert_array_equal(feeds["next_ids"], ids[:, 2:])
    np.testing.assert_array_equal(feeds["positions"], np.tile(np.arange(SEQ - 2), (2, 1)))
    assert feeds["past_ckv.0"].shape == (2, 0, 64)


def test_short_windows_are_refused(chain: tuple[DeepseekV3ForCausalLM, ExportGraphs]) -> None:
    _, graphs = chain
    assert min_window(2) == 4 and min_window(1) == min_window(0) == 3
    short = [w[:, :3] for w in windows()]
    with pytest.raises(
        UserError, match=r"window of 3 tokens is too short: prefill and 2 MTP module\(s\) need at least 4"
    ):
        calibrate(graphs, matmuls(graphs, "mtp.1"), 2, text=short)
    assert calibrate(graphs, matmuls(graphs, "mtp.1"), 1, text=[w[:, :4] for w in windows()])


def test_roles_run_in_chain_order() -> None:
    roles = ["mtp.10", "mtp.2", "decode", *(f"mtp.{d}" for d in range(3, 10)), "mtp", "mtp.1", "prefill", "head"]
    assert chain_order(roles) == ["prefill", "decode", "mtp", *(f"mtp.{d}" for d in range(1, 11)), "head"]
    assert chain_order(["mtp.2", "mtp", "prefill"]) == ["prefill", "mtp", "mtp.2"]  # a gap: mtp.2 reads no mtp.1


def test_report_on_text_runs_the_chain(chain: tuple[DeepseekV3ForCausalLM, ExportGraphs]) -> None:
    """quantize --report on text feeds the graphs the same way: every MTP module gets rows, an export
    against itself has no error."""
    from dsv3c.passes.report import compare_exports

    _, graphs = chain
    report = compare_exports(graphs.folder, {"same": graphs.folder}, batches=1, text=windows()[:1])
    assert [r.graph for r in report.rows if r.tensor == "logits"] == ["prefill", "decode", "mtp", "mtp.1", "all"]
    assert all(r.errors["same"] == 0.0 for r in report.rows)
