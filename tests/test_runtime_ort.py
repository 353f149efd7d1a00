"""onnxruntime over an export folder against the PyTorch model; the cache buffers; bad input through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dsv3c.cli.main import main
from dsv3c.errors import UserError
from dsv3c.models.checkpoint import load_model
from dsv3c.runtime.generate import generate
from dsv3c.runtime.latent_buffers import GROWTH_CHUNK, LatentBuffers
from dsv3c.runtime.ort_backend import OrtBackend, OrtEngine
from dsv3c.runtime.sampling import SamplingConfig
from dsv3c.runtime.torch_backend import TorchBackend

PROMPTS = [[5, 17, 301, 42, 9, 77, 120], [3, 4], [250, 251, 252, 253]]  # three lengths


@pytest.fixture(scope="module")
def torch_tokens(tiny_checkpoint: Path) -> list[list[int]]:
    return generate(TorchBackend(load_model(tiny_checkpoint)), PROMPTS, 32)


def test_ort_greedy_equals_torch_token_for_token(tiny_export: Path, torch_tokens: list[list[int]]) -> None:
    ort_tokens = generate(OrtBackend(tiny_export), PROMPTS, 32)
    assert [len(t) for t in ort_tokens] == [32, 32, 32]
    assert ort_tokens == torch_tokens


def test_ort_rows_do_not_depend_on_their_batch(tiny_export: Path, torch_tokens: list[list[int]]) -> None:
    backend = OrtBackend(tiny_export)
    assert generate(backend, [PROMPTS[1]], 32) == [torch_tokens[1]]


def test_ort_logits_match_torch_through_decode(tiny_export: Path, tiny_checkpoint: Path) -> None:
    ours, theirs = TorchBackend(load_model(tiny_checkpoint)), OrtBackend(tiny_export)
    a, b = ours.prefill(PROMPTS, 16), theirs.prefill(PROMPTS, 16)
    assert abs(a - b).max() < 1e-4 * abs(a).max()
    tokens = a.argmax(-1)
    a, b = ours.decode(tokens), theirs.decode(tokens)
    assert abs(a - b).max() < 1e-4 * abs(a).max()


def test_seeded_sampling_and_stop_ids(tiny_export: Path, torch_tokens: list[list[int]]) -> None:
    backend = OrtBackend(tiny_export)
    sampled = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95, seed=7)
    first, again = generate(backend, PROMPTS, 8, sampled), generate(backend, PROMPTS, 8, sampled)
    assert first == again
    stop = torch_tokens[0][3]
    stopped = generate(backend, PROMPTS, 32, stop_ids=[stop])
    assert stopped[0] == torch_tokens[0][: torch_tokens[0].index(stop) + 1]


def test_cache_grows_by_chunks_and_writes_per_row_slots() -> None:
    cache = LatentBuffers(2, 2, (4, 2), torch.float32, torch.device("cpu"), 10)
    assert cache.capacity == GROWTH_CHUNK
    first = cache.ckv[0]
    cache.reserve(GROWTH_CHUNK)  # fits: no new buffer
    assert cache.ckv[0] is first
    positions = torch.tensor([[3, 4], [0, 1]])
    cache.write(1, torch.ones(2, 2, 4), torch.full((2, 2, 2), 2.0), positions)
    cache.reserve(GROWTH_CHUNK + 1)
    assert cache.capacity == 2 * GROWTH_CHUNK and cache.ckv[0] is not first
    assert cache.ckv[1][0, 3:5].eq(1).all() and cache.ckv[1][1, :2].eq(1).all() and cache.ckv[1][0, :3].eq(0).all()
    assert cache.bytes_per_token == (4 + 2) * 2 * 4
    assert cache.ckv[1].data_ptr() == cache.ckv_layers[1].data_ptr()  # grown, the layers are views again


def test_write_layers_stores_what_a_write_per_layer_stores() -> None:
    one, every = (LatentBuffers(3, 2, (4, 2), torch.float32, torch.device("cpu"), 10) for _ in range(2))
    positions = torch.tensor([[5, 6], [2, 3]])
    ckv, kpe = torch.randn(3, 2, 2, 4), torch.randn(3, 2, 2, 2)
    for layer in range(3):
        one.write(layer, ckv[layer], kpe[layer], positions)
    every.write_layers(ckv, kpe, positions, torch.arange(2)[:, None])
    for layer in range(3):
        assert torch.equal(one.ckv[layer], every.ckv[layer]) and torch.equal(one.kpe[layer], every.kpe[layer])
    assert every.ckv[2][1, 3].equal(ckv[2, 1, 1]) and every.ckv[2][1, 4].eq(0).all()


def test_weights_none_export_is_refused(tmp_path: Path, tiny_export: Path) -> None:
    import shutil

    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_export, folder)
    text = (folder / "manifest.json").read_text().replace('"weights": "checkpoint"', '"weights": "none"')
    (folder / "manifest.json").write_text(text)
    with pytest.raises(UserError, match="weights none"):
        OrtEngine(folder)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{nowhere}", "--prompt-ids", "1"], "no such folder"),
        (["{tmp}", "--prompt-ids", "1"], "neither a checkpoint folder"),
        (["{export}", "--prompt-ids", "1,2,999"], "outside the vocabulary"),
        (["{export}", "--prompt-ids", "1,2", "--max-new-tokens", "1023"], "maximum context"),
        (["{export}", "--prompt-ids", "-1"], "outside the vocabulary"),
        (["{checkpoint}", "--runtime", "ort", "--prompt-ids", "1"], "dsv3c export first"),
        (["{export}", "--prompt", "hello"], "tokenizer.json"),
        (["{export}"], "no prompt given"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str],
    message: str,
    tiny_export: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = {"nowhere": tmp_path / "missing", "tmp": tmp_path, "export": tiny_export, "checkpoint": tiny_checkpoint}
    code = main(["generate", *(a.format(**paths) for a in argv)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_generate_ort_json(
    tiny_export: Path, torch_tokens: list[list[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    argv = ["generate", str(tiny_export), "--max-new-tokens", "32", "--json"]
    for prompt in PROMPTS:
        argv += ["--prompt-ids", ",".join(map(str, prompt))]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == torch_tokens


def test_bf16_export_runs_on_cpu_within_bf16_tolerance_of_torch_bf16(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """onnxruntime's CPU provider has no bf16 MatMul: the runtime computes the graph in float32
    (runtime/float_compute.py) on the bf16 weights; torch bf16 rounds after every op, hence the tolerance."""
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder

    folder = tmp_path / "bf16"
    export(from_folder(tiny_checkpoint), folder, weights="checkpoint", dtype="bf16")
    engine = OrtEngine(folder)
    assert all(g.float_compute for g in engine.graphs.values()) and engine.dtype == torch.float32
    ours, theirs = TorchBackend(load_model(tiny_checkpoint, dtype=torch.bfloat16)), OrtBackend(folder)
    a, b = ours.prefill(PROMPTS, 16), theirs.prefill(PROMPTS, 16)
    assert abs(a - b).max() < 3e-2 * abs(a).max()
    for _ in range(3):
        tokens = a.argmax(-1)
        a, b = ours.decode(tokens), theirs.decode(tokens)
        assert abs(a - b).max() < 3e-2 * abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 2 / 3


def test_static_decoder_steps_equal_the_dynamic_engine(tiny_export: Path) -> None:
    """The fixed (batch, capacity) session that CUDA graphs replay computes what OrtEngine computes."""
    from dsv3c.runtime.ort_cuda_graph import StaticDecoder

    engine = OrtEngine(tiny_export, roles=("prefill", "decode"))
    ids = torch.randint(0, engine.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    engine.start(2, 64)
    engine.prefill(ids[:, :6], torch.arange(6).expand(2, -1).contiguous())
    static = StaticDecoder(tiny_export, 2, 64, device="cpu", profile=True)
    assert engine.cache is not None and static.capacity == engine.cache.capacity
    for i in range(len(static.cache.ckv)):
        static.cache.ckv[i].copy_(engine.cache.ckv[i])
        static.cache.kpe[i].copy_(engine.cache.kpe[i])
    for step in range(3):
        positions = torch.full((2, 1), 6 + step)
        want = engine.decode(ids[:, 6 + step : 7 + step], positions).logits
        got = static.step(ids[:, 6 + step : 7 + step], positions)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    placement = static.placement()
    assert placement.by_provider.get("CPUExecutionProvider", 0) > 10 and not placement.off_device


def test_inspect_placement_counts_nodes_per_provider(tiny_export: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["inspect", str(tiny_export), "--placement", "cpu", "--format", "json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["provider"] == "CPUExecutionProvider" and found["by_provider"]["CPUExecutionProvider"] > 10
    assert found["off_device"] == {}
