"""MTP speculative decoding gives exactly the greedy output, on onnxruntime and PyTorch, and reports acceptance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dsv3c.cli.main import main
from dsv3c.models.checkpoint import load_model
from dsv3c.runtime.engine import Engine, EngineBackend, StepOutput
from dsv3c.runtime.generate import generate
from dsv3c.runtime.ort_backend import OrtEngine
from dsv3c.runtime.speculative import generate_mtp
from dsv3c.runtime.torch_backend import TorchEngine

PROMPTS = [[5, 17, 301, 42, 9, 77, 120], [3, 4], [250, 251, 252, 253]]


@pytest.fixture(scope="module")
def greedy(tiny_export: Path) -> list[list[int]]:
    return generate(EngineBackend(OrtEngine(tiny_export)), PROMPTS, 32)


def test_mtp_on_ort_equals_greedy(tiny_export: Path, greedy: list[list[int]]) -> None:
    tokens, stats = generate_mtp(OrtEngine(tiny_export), PROMPTS, 32)
    assert tokens == greedy
    assert stats.drafted > 0 and 0.0 <= stats.acceptance_rate <= 1.0
    assert stats.tokens == 96 and stats.tokens_per_call >= 1.0


def test_mtp_on_torch_equals_greedy(tiny_checkpoint: Path, greedy: list[list[int]]) -> None:
    tokens, stats = generate_mtp(TorchEngine(load_model(tiny_checkpoint)), PROMPTS, 12)
    assert tokens == [row[:12] for row in greedy]
    assert stats.drafted > 0


class OracleDrafts:
    """Wraps an engine; its MTP step drafts the true greedy token, except at every third position."""

    def __init__(self, engine: Engine, sequences: list[list[int]]):
        self.engine, self.sequences = engine, sequences
        self.config, self.device, self.mtp_depth = engine.config, engine.device, 1

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def mtp(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, depth: int = 0) -> StepOutput:
        out = self.engine.mtp(next_ids, hidden, positions, depth)
        logits = torch.zeros_like(out.logits)
        for b, row in enumerate(positions.tolist()):
            for i, t in enumerate(row):  # slot at position t drafts token t + 2
                truth = self.sequences[b][t + 2] if t + 2 < len(self.sequences[b]) else 0
                logits[b, i, (truth + (t % 3 == 0)) % self.config.vocab_size] = 1.0
        return StepOutput(logits, out.hidden)


def test_accepted_drafts_keep_the_greedy_output(tiny_export: Path, greedy: list[list[int]]) -> None:
    sequences = [p + g for p, g in zip(PROMPTS, greedy, strict=True)]
    engine = OracleDrafts(OrtEngine(tiny_export), sequences)
    tokens, stats = generate_mtp(engine, PROMPTS, 32)  # type: ignore[arg-type]
    assert tokens == greedy
    assert 0.4 < stats.acceptance_rate < 1.0
    assert stats.tokens_per_call > 1.3 and stats.main_calls < 32
    assert len(set(stats.per_row_accepted)) > 1  # rows accepted different numbers: they drifted apart


def test_cli_mtp_reports_acceptance(
    tiny_export: Path, greedy: list[list[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", str(tiny_export), "--mtp", "--json", "--max-new-tokens", "32"]
    for prompt in PROMPTS:
        argv += ["--prompt-ids", ",".join(map(str, prompt))]
    assert main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["ids"] == greedy
    assert {"acceptance_rate", "tokens_per_call", "drafted", "accepted"} <= result["mtp"].keys()
    assert "acceptance" in captured.err


@pytest.mark.parametrize("runtime", ["torch", "ort"])
def test_every_draft_is_the_reference_mtp_prediction(tiny_checkpoint: Path, tiny_export: Path, runtime: str) -> None:
    """Greedy output cannot reveal a wrong draft (verification hides it): check each draft directly against
    the reference MTP module run from scratch on the committed tokens."""
    from dsv3c.runtime.sampling import Sampler, SamplingConfig
    from dsv3c.runtime.speculative import SpecStats, _Rows, _Speculation

    model = load_model(tiny_checkpoint)
    engine = TorchEngine(model) if runtime == "torch" else OrtEngine(tiny_export)
    prompts = [[5, 17, 301, 42, 9], [3, 4]]
    rows = _Rows(len(prompts), 10, (), None)
    loop = _Speculation(engine, Sampler(SamplingConfig()), rows, SpecStats(per_row_accepted=[0, 0]))
    loop.prefill(prompts, 10)
    checked = 0
    while not rows.done.all():
        for row, prompt in enumerate(prompts):
            if rows.done[row]:
                continue
            seq = prompt + rows.out[row]  # n committed tokens; the draft guesses token n
            assert len(seq) == int(loop.n[row])
            with torch.no_grad():
                hidden = model(torch.tensor([seq[:-1]])).hidden_states  # h_t for t < n - 1
                logits, _, _ = model.forward_mtp(torch.tensor([seq[1:]]), hidden)  # slot n - 2 predicts token n
            assert int(loop.drafts[row, 0]) == int(logits[0, -1].argmax())
            checked += 1
        loop.step()
    assert checked >= 10
