"""The files each rank reads from its `rank-{r}/` folder of a `dsv3c partition` folder: rank.json (which rank
of how many) and model.safetensors.index.json (its shards). Any bytes give a model or one UserError, never
another exception; through `dsv3c generate PARTITION --ep N` (as torchrun starts it), exit code 2 and one line."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from dsv3c.cli.main import main
from dsv3c.errors import UserError
from dsv3c.models.checkpoint_layout import INDEX_FILE
from dsv3c.parallel.partition import RANK_FILE, partition_checkpoint, read_partition
from dsv3c.parallel.rank_model import load_rank_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .parallel_common import one_thread  # noqa: F401 (autouse: one thread, as the ranks)
from .test_hypothesis_user_files import contents, json_values

DEEP = b"[" * 50_000  # nested deeper than Python's JSON parser recurses


@pytest.fixture(scope="module")
def part2(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("readers") / "part2"
    partition_checkpoint(tiny_checkpoint, 2, folder)
    return folder


def _load(part: Path, name: str, data: bytes) -> str | None:
    """load_rank_model for rank 1 with rank-1/NAME replaced by `data` (restored afterwards): the UserError's
    message, or None when the model loaded."""
    path = part / "rank-1" / name
    kept = path.read_bytes()
    path.write_bytes(data)
    try:
        load_rank_model(part, read_partition(part).plan, 1)
    except UserError as e:
        assert "\n" not in str(e)
        return str(e)
    finally:
        path.write_bytes(kept)
    return None


def test_the_partition_as_written_loads(part2: Path) -> None:
    for name in (RANK_FILE, INDEX_FILE):
        assert _load(part2, name, (part2 / "rank-1" / name).read_bytes()) is None


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from([RANK_FILE, INDEX_FILE]), data=contents)
def test_any_rank_file_loads_or_is_one_user_error(part2: Path, name: str, data: bytes) -> None:
    _load(part2, name, data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rank=json_values, ranks=json_values)
def test_edited_rank_numbers_load_or_are_one_user_error(part2: Path, rank, ranks) -> None:
    message = _load(part2, RANK_FILE, json.dumps({"rank": rank, "ranks": ranks}).encode())
    right = type(rank) is int and type(ranks) is int and (rank, ranks) == (1, 2)
    assert (message is None) == right, message


def _index(weight_map: object) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": weight_map}).encode()


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        (RANK_FILE, b"\xff\xfe{", "not UTF-8 text"),  # was UnicodeDecodeError
        (RANK_FILE, DEEP, "nested too deep"),  # was RecursionError
        (RANK_FILE, b"[1, 2]", "expected a JSON object, got an array"),  # was AttributeError
        (RANK_FILE, b'{"rank": true, "ranks": 2}', "holds rank True of 2"),  # was rank 1 (True == 1)
        (INDEX_FILE, b"\xff\xfe{", "not UTF-8 text"),  # was UnicodeDecodeError
        (INDEX_FILE, DEEP, "nested too deep"),  # was RecursionError
        (INDEX_FILE, _index(["a"]), "not a safetensors index"),  # was AttributeError (list.values)
        (INDEX_FILE, _index({"a": 3}), "not a safetensors index"),  # was TypeError from a path join
        # was opened, outside the rank folder
        (INDEX_FILE, _index({"a": "../../part2/rank-0/x.safetensors"}), "not a .safetensors file name"),
    ],
)
def test_a_damaged_rank_file_is_one_line(part2: Path, name: str, data: bytes, expected: str) -> None:
    message = _load(part2, name, data)
    assert message is not None and expected in message and "partition again" in message, message


# ---- through the CLI: one rank, as torchrun --nproc-per-node 1 starts it -------------------------------------


@pytest.fixture(scope="module")
def part1(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("readers") / "part1"
    partition_checkpoint(tiny_checkpoint, 1, folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("name", "data"), [(RANK_FILE, DEEP), (INDEX_FILE, b"\xff\xfe{")])
def test_generate_ep_on_a_damaged_rank_folder(
    part1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, name: str, data: bytes
) -> None:
    part = tmp_path / "part"
    shutil.copytree(part1, part)
    (part / "rank-0" / name).write_bytes(data)
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    code = main(["generate", str(part), "--ep", "1", "--ep-timeout", "30", "--prompt-ids", "1,2,3"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"{part / 'rank-0' / name}:" in lines[0] and "partition again" in lines[0], lines[0]
