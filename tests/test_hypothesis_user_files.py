"""The other files a user's folders hold, generated: generation_config.json (EOS ids), partition.json,
engine_manifest.json, and a manifest.json that --force reads to tell dsv3c's folders from the user's. Any
bytes give a result or one UserError, never another exception."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dsv3c.artifact.atomic import check_output
from dsv3c.artifact.engine_manifest import ENGINE_MANIFEST, read_engine_manifest
from dsv3c.errors import UserError
from dsv3c.parallel.partition import PARTITION_FILE, read_partition
from dsv3c.runtime.loading import eos_ids, related_folders
from hypothesis import given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# JSON nested deeper than Python's parser recurses
deep_json = st.integers(1_000, 100_000).flatmap(lambda n: st.sampled_from(["[" * n, '{"a":' * n, "[" * n + "]" * n]))
contents = (
    st.binary(max_size=40)
    | deep_json.map(str.encode)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries({"eos_token_id": json_values}).map(lambda v: json.dumps(v).encode())
    | st.sampled_from([b'{"eos_token_id": 1e999}', b'{"eos_token_id": NaN}', b'{"eos_token_id": [1, true]}'])
)


def _eos(folder: Path) -> None:
    ids = eos_ids(folder)
    assert isinstance(ids, list) and all(type(i) is int for i in ids)


def _refuse_force(folder: Path) -> None:
    (folder / "keep.txt").write_text("the user's")  # with a manifest no one could read: the user's folder
    check_output(folder, force=True)  # reaching here means --force would replace it: a UserError is expected


READERS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    "generation_config": ("generation_config.json", _eos),
    "partition": (PARTITION_FILE, read_partition),
    "engine_manifest": (ENGINE_MANIFEST, read_engine_manifest),
    "force": ("manifest.json", _refuse_force),
}


def _read(reader: str, data: bytes) -> str | None:
    """The UserError's message, or None when the file was read."""
    name, read = READERS[reader]
    with tempfile.TemporaryDirectory(prefix="dsv3c-hyp-") as tmp:
        (Path(tmp) / name).write_bytes(data)
        try:
            read(Path(tmp))
        except UserError as e:
            assert "\n" not in str(e)
            return str(e)
    return None


@settings(max_examples=300, deadline=None)
@given(reader=st.sampled_from(sorted(READERS)), data=contents)
def test_any_bytes_give_a_result_or_one_user_error(reader: str, data: bytes) -> None:
    message = _read(reader, data)
    if reader == "force":
        assert message is not None and "dsv3c did not write" in message


# ---- regression tests: each failed before its fix ----------------------------------------------------------


@pytest.mark.parametrize(
    ("reader", "data", "expected"),
    [
        ("generation_config", b"\xff\xfe{", "not a valid generation config"),  # was UnicodeDecodeError
        ("generation_config", b"[" * 50_000, "not a valid generation config"),  # was RecursionError
        ("generation_config", b'{"eos_token_id": 1e999}', "eos_token_id must be"),  # was TypeError
        ("generation_config", b'{"eos_token_id": "2"}', "eos_token_id must be"),  # was silently no EOS
        ("partition", b"[" * 50_000, "not a readable partition manifest"),  # was RecursionError
        ("engine_manifest", b"[" * 50_000, "cannot read"),  # was RecursionError
        ("force", b"[" * 50_000, "dsv3c did not write"),  # was RecursionError from --force's check
    ],
)
def test_files_no_one_could_read_are_one_line(reader: str, data: bytes, expected: str) -> None:
    """Found by probing these files with bytes (before this file, no generated test read them)."""
    message = _read(reader, data)
    assert message is not None and expected in message


def test_eos_ids_keep_their_list() -> None:
    assert _read("generation_config", b'{"eos_token_id": [1, 7]}') is None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "generation_config.json").write_text('{"eos_token_id": [1, 7]}')
        assert eos_ids(Path(tmp)) == [1, 7]


def test_an_export_source_no_file_system_holds_is_skipped(tmp_path: Path) -> None:
    """Found by probing: a manifest's recorded export source of 300 characters made Path.is_dir raise OSError
    (ENAMETOOLONG) while generate looked for the source checkpoint's tokenizer and EOS ids."""
    from dsv3c.artifact.manifest import MANIFEST_FILE

    from .fixtures.synthetic import Topology, build_model, write_export

    write_export(tmp_path, {"prefill": build_model(Topology(data=False)), "decode": build_model(Topology(data=False))})
    raw = json.loads((tmp_path / MANIFEST_FILE).read_text())
    raw["stages"] = [{"stage": "export", "source": "s" * 300}]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(raw))
    assert related_folders(tmp_path) == [tmp_path]
    assert eos_ids(tmp_path) == []
