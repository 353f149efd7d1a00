"""The command line as a user meets it: outputs, JSON, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DSV3C = [sys.executable, "-m", "dsv3c"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DSV3C, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    result = run("init", "--preset", "tiny", "--out", str(out), "--dtype", "fp8", "--seed", "3")
    assert result.returncode == 0, result.stderr
    return out


def test_generate_prints_ids_and_json(checkpoint: Path) -> None:
    plain = run("generate", str(checkpoint), "--prompt-ids", "1,2,3", "--max-new-tokens", "5")
    assert plain.returncode == 0, plain.stderr
    ids = [int(t) for t in plain.stdout.split()]
    assert len(ids) == 5
    single = run("generate", str(checkpoint), "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--json")
    assert json.loads(single.stdout) == {"ids": ids}
    batch = run(
        "generate", str(checkpoint), "--prompt-ids", "1,2,3", "--prompt-ids", "7", "--max-new-tokens", "5", "--json"
    )
    rows = json.loads(batch.stdout)["ids"]
    assert rows[0] == ids and len(rows[1]) == 5


def test_sampling_is_seeded(checkpoint: Path) -> None:
    args = (
        "generate",
        str(checkpoint),
        "--prompt-ids",
        "4,5",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.5",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
        "--json",
    )
    a, b = run(*args, "--seed", "1"), run(*args, "--seed", "1")
    assert a.returncode == 0 and a.stdout == b.stdout


def test_v3_is_refused_with_its_size_unless_config_only(tmp_path: Path) -> None:
    refused = run("init", "--preset", "v3", "--out", str(tmp_path / "v3"))
    assert refused.returncode == 2 and "GiB" in refused.stderr and not (tmp_path / "v3").exists()
    ok = run("init", "--preset", "v3", "--out", str(tmp_path / "v3"), "--config-only")
    assert ok.returncode == 0 and json.loads((tmp_path / "v3" / "config.json").read_text())["n_routed_experts"] == 256


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("init", "--preset", "huge", "--out", "{tmp}/x"), "unknown preset 'huge'"),
        (("generate", "{tmp}/absent", "--prompt-ids", "1"), "no such folder"),
        (("generate", "{ckpt}", "--prompt-ids", "1,100000"), "outside the vocabulary"),
        (("generate", "{ckpt}", "--prompt-ids", "1", "--max-new-tokens", "5000"), "maximum context"),
        (("generate", "{ckpt}", "--prompt-ids", "1", "--top-p", "0"), "--top-p"),
        (("generate", "{ckpt}", "--prompt-ids", "x,y"), "comma-separated token ids"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    checkpoint: Path, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = run(*(a.format(tmp=tmp_path, ckpt=checkpoint) for a in args))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2


def test_truncated_safetensors_is_a_clear_error(checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoint.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    result = run("generate", str(broken), "--prompt-ids", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "safetensors" in result.stderr


def test_export_format_mlir_runs_the_iree_lowering(checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("iree.compiler", reason="the mlir extra (iree-base-compiler) is not installed")
    out = tmp_path / "mlir"
    result = run("export", str(checkpoint), "--out", str(out), "--format", "mlir")
    assert result.returncode == 0, result.stderr
    for role in ("prefill", "decode", "mtp"):
        assert (out / f"{role}.mlir").read_text().lstrip().startswith("module")
    stages = [s["stage"] for s in json.loads((out / "manifest.json").read_text())["stages"]]
    assert stages == ["export", "lower"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
