"""Chained MTP drafts: a model with 2 MTP modules exports both, and drafts 2 tokens per step on PyTorch and
onnxruntime, each the reference chain's prediction, with output identical to plain greedy (random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dsv3c.artifact.manifest import read_manifest
from dsv3c.cli.main import main
from dsv3c.errors import UserError
from dsv3c.models.checkpoint import load_model
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3c.runtime.engine import Engine, EngineBackend, StepOutput
from dsv3c.runtime.generate import generate
from dsv3c.runtime.ort_backend import OrtEngine
from dsv3c.runtime.sampling import Sampler, SamplingConfig
from dsv3c.runtime.speculative import SpecStats, _Rows, _Speculation, generate_mtp
from dsv3c.runtime.torch_backend import TorchEngine

from .conftest import random_model
from .fixtures.threads import one_thread  # noqa: F401  (autouse: this module decodes on one thread)

PROMPTS = [[5, 17, 301, 42, 9, 77, 120], [3], [250, 251, 252, 253]]
NEW = 24


@pytest.fixture(scope="module")
def chain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with two MTP modules, random weights."""
    from dsv3c.models.checkpoint import save_model

    config = DeepseekV3Config.from_dict(
        {**DeepseekV3Config.from_preset("tiny").to_dict(), "num_nextn_predict_layers": 2}
    )
    folder = tmp_path_factory.mktemp("mtp-chain") / "checkpoint"
    save_model(random_model(config, seed=1), folder)
    return folder


@pytest.fixture(scope="module")
def chain_export(chain_checkpoint: Path) -> Path:
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder

    folder = chain_checkpoint.parent / "export"
    export(from_folder(chain_checkpoint), folder, weights="checkpoint")
    return folder


@pytest.fixture(scope="module")
def greedy(chain_export: Path) -> list[list[int]]:
    return generate(EngineBackend(OrtEngine(chain_export, threads=1)), PROMPTS, NEW)


def test_export_has_one_graph_per_mtp_module(chain_checkpoint: Path, chain_export: Path) -> None:
    manifest = read_manifest(chain_export)
    assert manifest.graphs["mtp"] == "mtp.onnx" and manifest.graphs["mtp.1"] == "mtp.1.onnx"
    assert manifest.cache.mtp_layers == 2
    assert manifest.signatures["mtp.1"] == manifest.signatures["mtp"]
    weights = {t.name for t in manifest.load_structure("mtp.1").graph.initializer}
    assert weights and all(w.startswith("mtp.1.") for w in weights if w.startswith("mtp."))
    assert not any(w.startswith("mtp.0.") for w in weights)
    # module 1 on onnxruntime computes the reference module 1 (its own weights, not module 0's)
    model = load_model(chain_checkpoint)
    engine = OrtEngine(chain_export, threads=1)
    engine.start(1, 8)
    ids, hidden = torch.tensor([[7, 8, 9, 10]]), torch.randn(1, 4, model.config.hidden_size)
    positions = torch.arange(4)[None]
    ort = engine.mtp(ids, hidden, positions, depth=1)
    with torch.no_grad():
        logits, state, _ = model.forward_mtp(ids, hidden, depth=1)
        other, _, _ = model.forward_mtp(ids, hidden, depth=0)
    assert torch.allclose(ort.logits, logits, atol=1e-4) and torch.allclose(ort.hidden, state, atol=1e-4)
    assert not torch.allclose(logits, other, atol=1e-2)


def reference_drafts(model: DeepseekV3ForCausalLM, seq: list[int], depth: int) -> list[int]:
    """The chain run from scratch on the committed tokens: module d reads module d-1's states and the drafts."""
    drafts: list[int] = []
    with torch.no_grad():
        state = model(torch.tensor([seq[:-1]])).hidden_states  # slots 0 .. n - 2
        for d in range(depth):
            tokens = (seq + drafts)[1 + d :]  # token t + 1 + d at slot t
            logits, state, _ = model.forward_mtp(torch.tensor([tokens]), state, depth=d)
            drafts.append(int(logits[0, -1].argmax()))
    return drafts


@pytest.mark.parametrize("runtime", ["torch", "ort"])
def test_every_draft_is_the_reference_chain(chain_checkpoint: Path, chain_export: Path, runtime: str) -> None:
    """Verification hides a wrong draft from the output: check both drafts of every step directly."""
    model = load_model(chain_checkpoint)
    engine = TorchEngine(model) if runtime == "torch" else OrtEngine(chain_export, threads=1)
    prompts = [[5, 17, 301, 42, 9], [3], [250, 251]]
    rows = _Rows(len(prompts), 8, (), None)
    loop = _Speculation(engine, Sampler(SamplingConfig()), rows, SpecStats(depth=2, per_row_accepted=[0] * 3))
    loop.prefill(prompts, 8)
    checked = 0
    while not rows.done.all():
        for row, prompt in enumerate(prompts):
            if rows.done[row]:
                continue
            seq = prompt + rows.out[row]
            assert len(seq) == int(loop.n[row])
            assert loop.drafts[row].tolist() == reference_drafts(model, seq, 2)
            checked += 1
        loop.step()
    assert checked >= 20


class OracleChain:
    """Wraps an engine; MTP module d drafts the true greedy token, except where (position + d) % (4 + row) == 0."""

    def __init__(self, engine: Engine, sequences: list[list[int]]):
        self.engine, self.sequences = engine, sequences
        self.config, self.device, self.mtp_depth = engine.config, engine.device, engine.mtp_depth

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def mtp(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, depth: int = 0) -> StepOutput:
        out = self.engine.mtp(next_ids, hidden, positions, depth)
        logits = torch.zeros_like(out.logits)
        for b, row in enumerate(positions.tolist()):
            for i, t in enumerate(row):  # the slot at position t drafts token t + 2 + depth
                seq = self.sequences[b]
                truth = seq[t + 2 + depth] if t + 2 + depth < len(seq) else 0
                logits[b, i, (truth + ((t + depth) % (4 + b) == 0)) % self.config.vocab_size] = 1.0
        return StepOutput(logits, out.hidden)


def test_chained_drafts_keep_the_greedy_output(chain_export: Path, greedy: list[list[int]]) -> None:
    """Drafts that are often right (random weights' never are): every accepted length 0..2 occurs."""
    sequences = [p + g for p, g in zip(PROMPTS, greedy, strict=True)]
    inner = OrtEngine(chain_export, threads=1)
    tokens, stats = generate_mtp(OracleChain(inner, sequences), PROMPTS, NEW)  # type: ignore[arg-type]
    assert tokens == greedy
    assert stats.depth == 2 and stats.drafted == 2 * stats.reached[0]
    rates = stats.acceptance_per_depth
    assert 0.5 < rates[0] < 1.0 and 0.5 < rates[1] < 1.0  # so 0, 1 and 2 drafts were each accepted at times
    assert stats.tokens_per_call > 2.0 and stats.main_calls <= NEW / 2  # plain decoding: NEW calls
    assert len(set(stats.per_row_accepted)) > 1  # rows accepted different numbers: they drifted apart
    one, one_stats = generate_mtp(OracleChain(inner, sequences), PROMPTS, NEW, depth=1)  # type: ignore[arg-type]
    assert one == greedy and one_stats.tokens_per_call < stats.tokens_per_call


@pytest.mark.parametrize("runtime", ["torch", "ort"])
def test_real_drafts_equal_greedy(
    chain_checkpoint: Path, chain_export: Path, greedy: list[list[int]], runtime: str
) -> None:
    engine = TorchEngine(load_model(chain_checkpoint)) if runtime == "torch" else OrtEngine(chain_export, threads=1)
    assert engine.mtp_depth == 2
    tokens, stats = generate_mtp(engine, PROMPTS, NEW)
    assert tokens == greedy and stats.depth == 2
    with pytest.raises(UserError, match="--mtp-depth must be 1 to 2"):
        generate_mtp(engine, PROMPTS, NEW, depth=3)


def test_cli_uses_every_depth(chain_export: Path, greedy: list[list[int]], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", str(chain_export), "--mtp", "--json", "--max-new-tokens", str(NEW)]
    for prompt in PROMPTS:
        argv += ["--prompt-ids", ",".join(map(str, prompt))]
    assert main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["ids"] == greedy and result["mtp"]["depth"] == 2
    assert len(result["mtp"]["acceptance_per_depth"]) == 2 and "depth 2" in captured.err
    assert main([*argv, "--mtp-depth", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ids"] == greedy and result["mtp"]["depth"] == 1
    assert main([*argv, "--mtp-depth", "3"]) == 2
    assert "--mtp-depth must be 1 to 2" in capsys.readouterr().err


def test_speedup_rows_per_depth(chain_export: Path) -> None:
    from dsv3c.eval.speedup import measure_speedup

    rows = measure_speedup(OrtEngine(chain_export, threads=1), "ort", PROMPTS[:2], 6, repeats=1)
    assert [r.depth for r in rows] == [1, 2] and all(r.identical for r in rows)
    assert [len(r.acceptance_per_depth) for r in rows] == [1, 2]
    assert rows[0].greedy_s == rows[1].greedy_s  # one greedy timing, side by side with every depth
    assert rows[1].drafted == 2 * rows[0].drafted  # random weights: no draft accepted, same steps, 2 drafts each
