"""dsv3c partition: per-rank folders hold the replicated tensors and their own experts, read tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dsv3c.cli.main import main
from dsv3c.errors import UserError
from dsv3c.models import checkpoint as checkpoint_module
from dsv3c.models.checkpoint import load_model, save_model
from dsv3c.parallel import partition as partition_module
from dsv3c.parallel.partition import PARTITION_FILE, partition_checkpoint, read_partition
from dsv3c.parallel.plan import ExpertPlan, routed_expert
from dsv3c.parallel.rank_model import RemoteExpert, load_rank_model, source_plan
from safetensors import safe_open


class _Reads:
    """Wraps safetensors.safe_open in a module and records every tensor read through it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object):
        self.keys: list[str] = []
        real = safe_open
        reads = self

        class Handle:
            def __init__(self, path, framework):
                self.inner = real(path, framework=framework)

            def __enter__(self):
                self.f = self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_slice(self, key):
                return self.f.get_slice(key)

            def get_tensor(self, key):
                reads.keys.append(key)
                return self.f.get_tensor(key)

        monkeypatch.setattr(module, "safe_open", Handle)


@pytest.fixture(scope="module")
def fp8_sharded(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as DeepSeek's block fp8, in several shards (so partition goes shard by shard)."""
    folder = tmp_path_factory.mktemp("parallel") / "fp8"
    save_model(tiny_model, folder, dtype="fp8", max_shard_bytes=1_000_000)
    return folder


def test_plan_splits_experts_into_contiguous_blocks() -> None:
    assert ExpertPlan.contiguous(8, 4).experts == ((0, 1), (2, 3), (4, 5), (6, 7))
    uneven = ExpertPlan.contiguous(8, 3)
    assert uneven.experts == ((0, 1, 2), (3, 4, 5), (6, 7))
    assert uneven.owners() == [0, 0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(UserError, match="at most --ep 8"):
        ExpertPlan.contiguous(8, 9)
    assert ExpertPlan.from_dict(uneven.to_dict(), "x") == uneven
    with pytest.raises(UserError, match="exactly once"):
        ExpertPlan.from_dict({"n_routed_experts": 8, "experts_per_rank": [[0, 1], [1, 2]]}, "x")


def test_routed_expert_names() -> None:
    assert routed_expert("model.layers.1.mlp.experts.7.down_proj.weight") == 7
    assert routed_expert("model.layers.1.mlp.experts.7.down_proj.weight_scale_inv") == 7
    assert routed_expert("mtp.0.block.mlp.experts.3.gate_proj.weight") == 3
    assert routed_expert("model.layers.1.mlp.shared_experts.gate_proj.weight") is None
    assert routed_expert("model.layers.1.mlp.gate.weight") is None
    assert routed_expert("model.layers.0.mlp.gate_proj.weight") is None


def test_each_rank_folder_holds_only_its_experts(fp8_sharded: Path, tmp_path: Path, monkeypatch) -> None:
    source = json.loads((fp8_sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(source.values())) > 1  # really sharded
    reads = _Reads(monkeypatch, partition_module)
    out = tmp_path / "part"
    manifest = partition_checkpoint(fp8_sharded, 4, out)
    assert sorted(reads.keys) == sorted(source)  # every stored tensor read once, one at a time
    assert manifest["format_version"] == 1 and manifest["ep"] == 4
    assert manifest["plan"]["experts_per_rank"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert "all_to_all_single" in manifest["collectives"]["dispatch"]
    replicated = {k for k in source if routed_expert(k) is None}
    for r, info in enumerate(manifest["ranks"]):
        folder = out / info["folder"]
        held = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        mine = {k for k in source if routed_expert(k) in (2 * r, 2 * r + 1)}
        assert set(held) == replicated | mine
        for key in [k for k in held if k.endswith("experts.1.down_proj.weight") or k.endswith("q_b_proj.weight")]:
            with safe_open(folder / held[key], "pt") as f, safe_open(fp8_sharded / source[key], "pt") as g:
                assert f.get_tensor(key).dtype == torch.float8_e4m3fn  # stored as in the source, scales too
                assert torch.equal(f.get_tensor(key).view(torch.uint8), g.get_tensor(key).view(torch.uint8))
                assert torch.equal(f.get_tensor(key + "_scale_inv"), g.get_tensor(key + "_scale_inv"))
        assert info["bytes"] == sum((folder / f).stat().st_size for f in info["files"]) - _headers(folder, info)
        assert all((folder / f).stat().st_mode & 0o044 == 0o044 for f in info["files"])  # readable by others
    assert read_partition(out).plan == ExpertPlan.contiguous(8, 4)


def _headers(folder: Path, info: dict) -> int:
    total = 0
    for file in info["files"]:
        raw = (folder / file).read_bytes()
        total += 8 + int.from_bytes(raw[:8], "little")
    return total


@pytest.mark.parametrize("from_partition", [True, False])
def test_a_rank_loads_only_its_share(fp8_sharded: Path, tmp_path: Path, monkeypatch, from_partition: bool) -> None:
    source = fp8_sharded
    if from_partition:
        source = tmp_path / "part"
        partition_checkpoint(fp8_sharded, 4, source)
    full = load_model(fp8_sharded)
    plan = source_plan(source, 4)
    reads = _Reads(monkeypatch, checkpoint_module)
    model = load_rank_model(source, plan, 1)
    assert reads.keys and {routed_expert(k) for k in reads.keys} <= {None, 2, 3}  # never another rank's expert
    experts = model.model.layers[1].mlp.experts
    assert [type(e).__name__ for e in experts] == ["RemoteExpert"] * 2 + ["MLP"] * 2 + ["RemoteExpert"] * 4
    assert isinstance(model.mtp[0].block.mlp.experts[0], RemoteExpert)
    ours = model.state_dict()
    theirs = full.state_dict()
    assert set(ours) == {k for k in theirs if routed_expert(k) in (None, 2, 3)}
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_rank_folder_opened_as_another_rank(fp8_sharded: Path, tmp_path: Path) -> None:
    out = tmp_path / "part"
    partition_checkpoint(fp8_sharded, 2, out)
    (out / "rank-1" / "rank.json").write_text(json.dumps({"rank": 0, "ranks": 2, "experts": []}))
    with pytest.raises(UserError, match="holds rank 0 of 2, but rank 1 of 2 opened it"):
        load_rank_model(out, read_partition(out).plan, 1)


def test_partition_failure_leaves_nothing(fp8_sharded: Path, tmp_path: Path, monkeypatch) -> None:
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    real = partition_module.save_file
    monkeypatch.setattr(partition_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        partition_checkpoint(fp8_sharded, 2, tmp_path / "part")
    assert list(tmp_path.iterdir()) == []


def test_cli(fp8_sharded: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "part"
    assert main(["partition", str(fp8_sharded), "--ep", "2", "--out", str(out)]) == 0
    assert "rank 1: experts 4-7" in capsys.readouterr().out
    assert (out / PARTITION_FILE).is_file()
    assert main(["partition", str(fp8_sharded), "--ep", "2", "--out", str(out)]) == 2  # exists, no --force
    assert main(["partition", str(fp8_sharded), "--ep", "2", "--out", str(out), "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["ep"] == 2
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    assert main(["partition", str(export), "--ep", "2", "--out", str(tmp_path / "p2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no collective op" in err
