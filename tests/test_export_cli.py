"""`dsv3c export` as a user meets it: determinism, --weights none, one-line errors, interrupted exports."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import dsv3c.cli.main as cli_main
import onnx
import pytest
from dsv3c.artifact.manifest import read_manifest
from dsv3c.export import exporter
from dsv3c.export.onnx_ops import register_schemas

from .test_export_common import Exported, exported_tiny

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return exported_tiny(tmp_path_factory)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run `dsv3c ARGS` in this process: (exit code, stdout, stderr)."""

    def call(*args: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = cli_main.main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return call


def test_two_exports_of_a_checkpoint_are_byte_identical(tiny: Exported, cli: Cli, tmp_path: Path) -> None:
    code, out, err = cli("export", tiny.checkpoint, "--out", tmp_path / "again")
    assert code == 0, err
    assert "prefill.onnx, decode.onnx, mtp.onnx" in out
    names = sorted(p.name for p in tiny.out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert (tiny.out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_weights_none_from_a_config_only_folder(tiny: Exported, cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    shutil.copy(tiny.checkpoint / "config.json", tmp_path / "cfg")
    code, _, err = cli("export", tmp_path / "cfg", "--out", tmp_path / "none", "--weights", "none")
    assert code == 0, err
    m = read_manifest(tmp_path / "none")
    assert m.weights == "none" and (tmp_path / "none" / "weights.bin").stat().st_size == 0
    register_schemas()
    path = m.graph_path("decode")
    onnx.checker.check_model(str(path), full_check=True)
    declared = {t.name: list(t.dims) for t in m.load_structure("decode").graph.initializer}
    c = tiny.model.config
    assert declared["model.layers.1.mlp.experts.down_proj.weight"] == [
        c.n_routed_experts,
        c.hidden_size,
        c.moe_intermediate_size,
    ]
    with pytest.raises(ValueError, match="exceeds"):
        onnx.load(str(path))  # the data is declared, not present: loading it fails loudly
    # the same structure as the export with weights
    assert [n.op_type for n in m.load_structure("decode").graph.node] == [
        n.op_type for n in tiny.manifest.load_structure("decode").graph.node
    ]


def folder_with(tmp_path: Path, tiny: Exported, what: str) -> Path:
    folder = tmp_path / what
    folder.mkdir()
    if what in ("config_only", "corrupt"):
        shutil.copy(tiny.checkpoint / "config.json", folder)
    if what == "corrupt":
        (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


BAD = {  # name: (arguments, with {ckpt}/{cfg}/{corrupt}/{empty}/{out}/{existing}; words the one line must hold)
    "no such folder": (["{tmp}/missing", "--out", "{out}"], "no such"),
    "no config.json": (["{empty}", "--out", "{out}"], "config.json"),
    "config only, no weights flag": (["{cfg}", "--out", "{out}"], "--weights random or --weights none"),
    "config only, checkpoint weights": (["{cfg}", "--out", "{out}", "--weights", "checkpoint"], "no weights"),
    "corrupt safetensors": (["{corrupt}", "--out", "{out}"], "safetensors"),
    "both folder and preset": (["{ckpt}", "--preset", "tiny", "--out", "{out}"], "either"),
    "neither": (["--out", "{out}"], "either"),
    "unknown preset": (["--preset", "v9", "--out", "{out}", "--weights", "none"], "unknown preset"),
    "bad opset": (["{ckpt}", "--out", "{out}", "--opset", "17"], "opset 17"),
    "bad weights kind": (["{ckpt}", "--out", "{out}", "--weights", "zeros"], "invalid choice"),
    "existing output": (["{ckpt}", "--out", "{existing}"], "--force"),
    "output parent missing": (["{ckpt}", "--out", "{tmp}/no/such/dir"], "does not exist"),
    "v3 random needs too much disk": (["--preset", "v3", "--out", "{out}", "--weights", "random"], "GiB"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2(tiny: Exported, cli: Cli, tmp_path: Path, case: str) -> None:
    args, words = BAD[case]
    (tmp_path / "existing").mkdir()
    paths = {"tmp": tmp_path, "ckpt": tiny.checkpoint, "out": tmp_path / "out", "existing": tmp_path / "existing"}
    for what, key in (("config_only", "cfg"), ("corrupt", "corrupt"), ("empty", "empty")):
        if "{" + key + "}" in " ".join(args):
            paths[key] = folder_with(tmp_path, tiny, what)
    code, out, err = cli("export", *(a.format(**paths) for a in args))
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert not (tmp_path / "out").exists()


def test_an_interrupted_export_leaves_nothing_behind(
    tiny: Exported, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "trace_graphs", interrupted)
    code, _, err = cli("export", tiny.checkpoint, "--out", tmp_path / "out")
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []
