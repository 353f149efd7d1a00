"""Checkpoint loading, generated: hostile safetensors headers (sizes, JSON, dtypes, shapes, offsets), truncated
and corrupted shards, broken index files. Reading the headers and streaming every tensor either works or
raises one UserError, never another exception."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
from dsv3c.errors import UserError
from dsv3c.models.checkpoint import init_random, load_state_dict_streaming, read_index, save_model
from dsv3c.models.config import DeepseekV3Config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = ["F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F64", "I64", "I8", "U8", "BOOL", "", "f32", "F32 "]


def _small_config() -> DeepseekV3Config:
    d = DeepseekV3Config.from_preset("tiny").to_dict()
    d.update(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        num_attention_heads=2,
        num_nextn_predict_layers=0,
    )
    return DeepseekV3Config.from_dict(d)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small valid FP8 checkpoint (one shard: weights, fp8 weights with scales)."""
    folder = tmp_path_factory.mktemp("good") / "ckpt"
    save_model(init_random(_small_config(), seed=0), folder, dtype="fp8")
    return folder


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict[str, Any] | bytes, body: bytes, size_field: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if size_field is None else size_field) + text + body


def _load_all(folder: Path) -> None:
    try:
        for _ in load_state_dict_streaming(read_index(folder)):
            pass
    except UserError as e:
        assert "\n" not in str(e)


def _with_shard(good: Path, data: bytes) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="dsv3c-hyp-"))
    shutil.copy(good / "config.json", tmp / "config.json")
    (tmp / "model.safetensors").write_bytes(data)
    return tmp


ints = st.one_of(
    st.integers(min_value=-3, max_value=300), st.sampled_from([2**31, 2**63 - 1, 2**64 - 1, 10**20, -(2**63)])
)


@st.composite
def header_edits(draw: st.DrawFn, header: dict[str, Any]) -> dict[str, Any]:
    names = sorted(k for k in header if k != "__metadata__")
    edited = json.loads(json.dumps(header))
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        what = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "rename", "type", "metadata"]))
        entry = edited.get(name)
        if not isinstance(entry, dict):
            continue
        if what == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPES) | st.text(max_size=5))
        elif what == "shape":
            entry["shape"] = draw(st.lists(ints, max_size=4) | st.just("x") | st.none())
        elif what == "offsets":
            entry["data_offsets"] = draw(st.lists(ints, min_size=0, max_size=3) | st.just({}))
        elif what == "drop":
            del edited[name]
        elif what == "rename":
            edited[name + draw(st.sampled_from(["_scale_inv", "x", ".bias"]))] = edited.pop(name)
        elif what == "type":
            edited[name] = draw(st.none() | st.integers() | st.text(max_size=3) | st.lists(st.integers(), max_size=2))
        else:
            edited["__metadata__"] = draw(st.none() | st.integers() | st.dictionaries(st.text(max_size=3), ints))
    return edited


@SETTINGS
@given(data=st.data())
def test_edited_headers(good: Path, data: st.DataObject) -> None:
    header, body = _split(good / "model.safetensors")
    folder = _with_shard(good, _join(data.draw(header_edits(header)), body))
    try:
        _load_all(folder)
    finally:
        shutil.rmtree(folder)


@SETTINGS
@given(data=st.data())
def test_header_size_field_and_raw_header_bytes(good: Path, data: st.DataObject) -> None:
    header, body = _split(good / "model.safetensors")
    text = json.dumps(header).encode()
    kind = data.draw(st.sampled_from(["size", "bytes", "cut"]))
    if kind == "size":
        blob = _join(text, body, data.draw(st.integers(0, 2**64 - 1)))
    elif kind == "bytes":
        blob = _join(data.draw(st.binary(max_size=200)), body)
    else:  # a header cut short, a prefix of the file, or garbage appended
        blob = _join(text, body)[: data.draw(st.integers(0, len(text) + len(body) + 8))]
    folder = _with_shard(good, blob)
    try:
        _load_all(folder)
    finally:
        shutil.rmtree(folder)


@SETTINGS
@given(data=st.data())
def test_corrupt_body_bytes_and_truncation(good: Path, data: st.DataObject) -> None:
    """Bit flips in the data (fp8 bytes may become NaN, scales anything): loads; cut: one error."""
    raw = bytearray((good / "model.safetensors").read_bytes())
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(0, 8))):
        raw[data.draw(st.integers(header_end, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.none() | st.integers(header_end, len(raw)))
    folder = _with_shard(good, bytes(raw[:cut]))
    try:
        _load_all(folder)
    finally:
        shutil.rmtree(folder)


# shard names: plain ones, and ones no file system holds (a name over 255 bytes)
shard_names = st.text(max_size=12) | st.sampled_from(["a" * 300 + ".safetensors", "x.safetensors", "loop.safetensors"])
# JSON nested deeper than Python's parser recurses
deep_json = st.integers(1_000, 100_000).flatmap(lambda n: st.sampled_from(["[" * n, '{"a":' * n, "[" * n + "]" * n]))


@SETTINGS
@given(
    index=st.recursive(
        st.none() | st.integers() | shard_names,
        lambda c: st.dictionaries(st.text(max_size=8), c, max_size=3) | st.lists(c, max_size=3),
        max_leaves=6,
    ),
    raw=st.binary(max_size=40) | deep_json.map(str.encode),
)
def test_broken_index_files(good: Path, index: Any, raw: bytes) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="dsv3c-hyp-"))
    try:
        shutil.copy(good / "config.json", tmp / "config.json")
        shutil.copy(good / "model.safetensors", tmp / "model-00001-of-00001.safetensors")
        (tmp / "loop.safetensors").symlink_to("loop.safetensors")
        weight_map = {k: "model-00001-of-00001.safetensors" for k in _split(good / "model.safetensors")[0]}
        variants = [index, {"weight_map": index}, {"weight_map": {**weight_map, "x": index}}]
        for v in variants:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(v))
            _load_all(tmp)
        (tmp / "model.safetensors.index.json").write_bytes(raw)  # not UTF-8, not JSON, nested too deep
        _load_all(tmp)
    finally:
        shutil.rmtree(tmp)


@pytest.mark.parametrize(
    "index",
    [
        json.dumps({"weight_map": {"model.norm.weight": "a" * 300 + ".safetensors"}}).encode(),  # was OSError
        b"\xff\xfe{",  # was UnicodeDecodeError
        b"[" * 50_000,  # was RecursionError
    ],
    ids=["shard-name-too-long", "not-utf8", "nested-too-deep"],
)
def test_an_index_no_one_could_read_is_one_line(good: Path, index: bytes) -> None:
    """Found by probing the index with what the generated tests did not draw (found before the draws did)."""
    tmp = _with_shard(good, (good / "model.safetensors").read_bytes())
    try:
        (tmp / "model.safetensors.index.json").write_bytes(index)
        with pytest.raises(UserError, match="index") as e:
            read_index(tmp)
        assert "\n" not in str(e.value)
    finally:
        shutil.rmtree(tmp)


@pytest.mark.parametrize("kind", ["folder", "dangling link", "link loop"])
def test_a_shard_that_is_not_a_file_is_one_line(good: Path, kind: str) -> None:
    """Found by probing: model.safetensors as a folder (or a link to nothing) raised StopIteration."""
    tmp = _with_shard(good, b"")
    try:
        shard = tmp / "model.safetensors"
        shard.unlink()
        if kind == "folder":
            shard.mkdir()
        else:
            shard.symlink_to("nowhere" if kind == "dangling link" else "model.safetensors")
        with pytest.raises(UserError, match="not a file"):
            read_index(tmp)
    finally:
        shutil.rmtree(tmp)


def test_a_newline_quoted_from_the_header_stays_on_one_line(good: Path) -> None:
    """Found by test_edited_headers in CI: safetensors echoes the bad dtype (here a newline) in its error."""
    header, body = _split(good / "model.safetensors")
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "\n"
    folder = _with_shard(good, _join(header, body))
    try:
        with pytest.raises(UserError) as e:
            for _ in load_state_dict_streaming(read_index(folder)):
                pass
        assert "\n" not in str(e.value) and "unreadable safetensors" in str(e.value)
    finally:
        shutil.rmtree(folder)
