"""An FP8 checkpoint exports to FP8: the checkpoint's bytes and scales unchanged, read back independently
(the safetensors header parsed by hand, the ONNX external data by offset), the block DequantizeLinear in
the graph, generation equal to the PyTorch model's, its own weight_block_size; quantize keeps it as is."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from dsv3c.artifact.export_folder import read_export
from dsv3c.cli import main as cli
from dsv3c.export.exporter import export
from dsv3c.export.source import from_folder
from dsv3c.models.checkpoint import init_random, load_model, save_model
from dsv3c.models.config import DeepseekV3Config, Fp8Quantization
from dsv3c.passes.lower import lower_folder
from dsv3c.passes.ort_run import FeedShape, GraphRunner, random_feeds, relative_error
from dsv3c.passes.pipelines import Target

FP8 = onnx.TensorProto.FLOAT8E4M3FN


def _config(block: tuple[int, int]) -> DeepseekV3Config:
    """Two layers (dense, MoE) with sizes that leave partial edge blocks for every block tried here."""
    d = DeepseekV3Config.from_preset("tiny").to_dict()
    d.update(num_hidden_layers=2, num_nextn_predict_layers=0)
    config = DeepseekV3Config.from_dict(d)
    return config.replace(quantization_config=Fp8Quantization(block))


def _raw_safetensors(folder: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, bytes) from every shard, parsing the format by hand (8-byte header size,
    JSON header, data offsets), so that the check does not share code with the exporter."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            out[name] = (info["dtype"], info["shape"], data[8 + n + start : 8 + n + end])
    return out


def _raw_initializers(folder: Path, role: str = "prefill") -> dict[str, tuple[int, list[int], bytes]]:
    """name -> (ONNX type, dims, bytes) of the graph's external initializers, read by offset and length."""
    proto = onnx.load(folder / f"{role}.onnx", load_external_data=False)
    out = {}
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        with open(folder / info["location"], "rb") as f:
            f.seek(int(info["offset"]))
            out[t.name] = (t.data_type, list(t.dims), f.read(int(info["length"])))
    return out


def _pair(root: Path, block: tuple[int, int]) -> tuple[Path, Path]:
    save_model(init_random(_config(block), seed=3), root / "ckpt", dtype="fp8")
    export(from_folder(root / "ckpt"), root / "export", weights="checkpoint")
    return root / "ckpt", root / "export"


@pytest.fixture(scope="module")
def block128(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _pair(tmp_path_factory.mktemp("fp8-128"), (128, 128))


@pytest.fixture(scope="module")
def block64x32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """DeepSeek's block is 128x128; a checkpoint with another weight_block_size is read with its own."""
    return _pair(tmp_path_factory.mktemp("fp8-64x32"), (64, 32))


@pytest.fixture(params=["block128", "block64x32"])
def fp8_pair(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    pair: tuple[Path, Path] = request.getfixturevalue(request.param)
    return pair


def test_fp8_bytes_and_scales_identical_to_the_checkpoint(fp8_pair: tuple[Path, Path]) -> None:
    ckpt, out = fp8_pair
    stored = _raw_safetensors(ckpt)
    inits = _raw_initializers(out)
    fp8_keys = [k for k, (dtype, _, _) in stored.items() if dtype == "F8_E4M3"]
    assert len(fp8_keys) > 10
    checked = set()
    for name, (elem_type, dims, data) in inits.items():
        if elem_type != FP8:
            continue
        keys = [name]
        if ".mlp.experts." in name:  # stacked [E, out, in]: expert e's bytes at e * (out * in)
            prefix, proj = name.split(".experts.")
            keys = [f"{prefix}.experts.{e}.{proj}" for e in range(dims[0])]
        assert data == b"".join(stored[k][2] for k in keys), name
        scale_type, scale_dims, scale_data = inits[name + "_scale_inv"]
        assert scale_type == onnx.TensorProto.FLOAT
        assert scale_data == b"".join(stored[k + "_scale_inv"][2] for k in keys), name  # F32 in the checkpoint
        assert scale_dims[-2:] == stored[keys[0] + "_scale_inv"][1]
        checked.update(keys)
    assert checked == set(fp8_keys)  # every FP8 tensor of the checkpoint, none dequantized
    manifest = json.loads((out / "manifest.json").read_text())
    block = manifest["config"]["quantization_config"]["weight_block_size"]
    assert manifest["stages"][0]["fp8_block"] == block


def test_graph_dequantizes_with_the_checkpoints_block(fp8_pair: tuple[Path, Path]) -> None:
    _, out = fp8_pair
    manifest = json.loads((out / "manifest.json").read_text())
    block = manifest["config"]["quantization_config"]["weight_block_size"]
    proto = onnx.load(out / "decode.onnx", load_external_data=False)
    fp8 = {t.name for t in proto.graph.initializer if t.data_type == FP8}
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in fp8]
    assert {n.input[0] for n in dqs} == fp8
    for node in dqs:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"axis": -1, "block_size": block[1]}


def test_generation_from_the_export_equals_the_torch_model(
    block64x32: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, out = block64x32
    prompt = ["--prompt-ids", "5,9,2,7", "--max-new-tokens", "6", "--json"]
    assert cli.main(["generate", str(ckpt), *prompt]) == 0
    torch_ids = json.loads(capsys.readouterr().out)["ids"]
    assert cli.main(["generate", str(out), "--runtime", "ort", *prompt]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == torch_ids
    # and the logits of the prompt agree closely (dequantization is exact in both)
    model = load_model(ckpt)
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        ref = model(ids).logits[0, -1].numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "prefill.onnx"))
    positions = np.arange(4, dtype=np.int64)[None]
    logits = session.run(["logits"], {"input_ids": ids.numpy(), "positions": positions})[0][0, -1]
    assert np.abs(logits - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_quantize_keeps_fp8_weights_as_they_are(block128: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = block128
    assert cli.main(["quantize", str(out), "--out", str(tmp_path / "q")]) == 0
    before, after = _raw_initializers(out), _raw_initializers(tmp_path / "q")
    fp8 = [n for n, (t, _, _) in before.items() if t == FP8]
    for name in fp8:
        assert after[name] == before[name] and after[name + "_scale_inv"] == before[name + "_scale_inv"]
    stage = json.loads((tmp_path / "q" / "manifest.json").read_text())["stages"][-1]
    assert set(fp8) <= set(stage["fp8_kept"]) and stage["grid_recognition"]["blocks"] == 0


@pytest.mark.parametrize("target", [Target.ORT, Target.PORTABLE])
def test_an_fp8_checkpoints_export_lowers_and_computes_the_same(
    block128: tuple[Path, Path], tmp_path: Path, target: Target
) -> None:
    """The experts reach the MoE through DequantizeLinear (no shape recorded); `lower --target ort` once
    failed there with 'expected a static shape'."""
    _, export_dir = block128
    out = lower_folder(export_dir, tmp_path / target.value, target).folder
    assert out is not None
    a, b = read_export(export_dir), read_export(out)
    for role in a.models:
        feeds = random_feeds(a.manifest, role, np.random.default_rng(7), FeedShape())
        want = GraphRunner(a.models[role], export_dir).run(feeds)
        got = GraphRunner(b.models[role], out).run(feeds)
        for name, value in want.items():
            assert relative_error(got[name], value) < 1e-4, (target, role, name)
