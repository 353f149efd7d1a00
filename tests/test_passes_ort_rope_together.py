"""The ort lowering rotates an MLA layer's query and key RoPE in one op (passes/ort_rope_together.py), and
computes attention's softmax on the 16-bit scores (passes/ort_half_softmax.py): same logits, fewer nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
import torch
from dsv3c.passes.ort_half_softmax import HalfSoftmaxPass
from dsv3c.passes.ort_rope_together import ROPE_LAST_SUFFIX, RopeTogetherPass
from dsv3c.passes.stages import StageResult

from .fixtures.exports import greedy_logits, lower_ort, mini_config

PLAIN_Q = {"q_lora_rank": None}  # V2-Lite's attention: the queries out of one projection with the latent KV


def _skipped(self: object, model: ir.Model) -> StageResult:
    return StageResult(model, False, {})


@pytest.fixture(scope="module", params=["fp32", "bf16", "bf16-8bit"])
def folders(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A plain-q mini model exported in fp32 or bf16, lowered with the two stages and without them
    (`-8bit`: `--weights-8bit`, the merged projection a MatMulNBits)."""
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder
    from dsv3c.models.checkpoint import init_random, save_model

    root = tmp_path_factory.mktemp(f"rope-together-{request.param}")
    save_model(init_random(mini_config(**PLAIN_Q), seed=3), root / "ckpt", dtype="bf16")
    dtype = request.param.removesuffix("-8bit")
    export(from_folder(root / "ckpt"), root / "export", weights="checkpoint", dtype=dtype)
    options = {"weights_8bit": 32} if request.param.endswith("-8bit") else {}  # values per scale
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RopeTogetherPass, "call", _skipped)
        patch.setattr(HalfSoftmaxPass, "call", _skipped)
        before = lower_ort(root / "export", root / "before", **options)
    after = lower_ort(root / "export", root / "after", **options)
    return {"dtype": dtype, "before": before, "after": after, "8bit": bool(options)}


def _ops(folder: Path, op: str, role: str = "decode") -> list[ir.Node]:
    return [n for n in ir.load(folder / f"{role}.onnx").graph if n.op_type == op]


def test_the_logits_do_not_change(folders: dict[str, Any]) -> None:
    """Prefill and decode steps over the cache: the same float32 arithmetic in another order of columns."""
    before, after = greedy_logits(folders["before"], steps=3), greedy_logits(folders["after"], steps=3)
    assert torch.equal(before.argmax(-1), after.argmax(-1))
    assert (before - after).abs().max() <= 1e-6 * before.abs().max()


@pytest.mark.parametrize("role", ["prefill", "decode", "mtp"])
def test_each_layer_rotates_its_query_heads_and_key_in_one_op(folders: dict[str, Path], role: str) -> None:
    config = mini_config(**PLAIN_Q)
    layers = config.num_hidden_layers if role != "mtp" else 1
    rotary = _ops(folders["after"], "RotaryEmbedding", role)
    assert len(_ops(folders["before"], "RotaryEmbedding", role)) == 2 * layers
    assert len(rotary) == layers
    assert all(n.attributes["num_heads"].as_int() == config.num_attention_heads + 1 for n in rotary)
    # the per-head Split of the queries into nope and rope is gone; a Split of the rotated parts is new
    heads_splits = [n for n in _ops(folders["after"], "Split", role) if n.attributes.get_int("axis", 0) == 3]
    assert not heads_splits
    casts = len(_ops(folders["before"], "Cast", role)) - len(_ops(folders["after"], "Cast", role))
    # a bf16 graph: two Casts per layer around the rope, two around attention's softmax
    assert casts == (4 * layers if folders["dtype"] == "bf16" else 0)


def test_the_reordered_weight_holds_the_same_columns(folders: dict[str, Any]) -> None:
    """[every head's nope | the latent | every head's rope | the key's rope], each column as it was."""
    config = mini_config(**PLAIN_Q)
    before = ir.load(folders["before"] / "decode.onnx").graph.initializers
    after = ir.load(folders["after"] / "decode.onnx").graph.initializers
    reordered = [name for name in after if ROPE_LAST_SUFFIX in name]
    eight_bit = folders["8bit"]  # rows [N, K / block, block] and scales [N, K / block]: along N
    assert len(reordered) == config.num_hidden_layers * (2 if eight_bit else 1)
    heads, nope, rope = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    for name in reordered:
        old_name = name.replace(ROPE_LAST_SUFFIX + name.rsplit(ROPE_LAST_SUFFIX, 1)[1], "")
        old = np.asarray(before[old_name].const_value.numpy())  # type: ignore[union-attr]
        new = np.asarray(after[name].const_value.numpy())  # type: ignore[union-attr]
        if eight_bit:
            old, new = np.moveaxis(old, 0, -1), np.moveaxis(new, 0, -1)  # the channels last, as a float weight's
            old, new = old.reshape(-1, old.shape[-1]), new.reshape(-1, new.shape[-1])
        q = old[:, : heads * (nope + rope)].reshape(old.shape[0], heads, nope + rope)
        latent, key = old[:, heads * (nope + rope) : -rope], old[:, -rope:]
        want = np.concatenate(
            [q[:, :, :nope].reshape(len(old), -1), latent, q[:, :, nope:].reshape(len(old), -1), key], 1
        )
        np.testing.assert_array_equal(new, want)
        assert old_name not in after  # not stored twice


def test_models_with_q_lora_keep_their_two_rotations(tmp_path: Path) -> None:
    """V3's queries come out of q_b_proj, not the latent's projection: nothing to join without a Concat."""
    from .fixtures.exports import mini_export

    folder = lower_ort(mini_export(tmp_path, dtype="bf16"), tmp_path / "ort")
    config = mini_config()
    assert len(_ops(folder, "RotaryEmbedding")) == 2 * config.num_hidden_layers


def test_query_and_key_at_other_positions_stay_apart(folders: dict[str, Any]) -> None:
    """A key rotated by other position ids (here an Identity of them: another value) is not joined."""
    model = ir.load(folders["before"] / "decode.onnx")
    keys = [n for n in model.graph if n.op_type == "RotaryEmbedding" and n.attributes.get_int("num_heads") == 1]
    assert keys
    for node in keys:
        positions = node.inputs[1]
        other = ir.Node("", "Identity", [positions], name=f"{node.name}/other_positions")
        model.graph.insert_before(node, other)
        node.replace_input_with(1, other.outputs[0])
    assert not RopeTogetherPass()(model).modified


def test_new_entries_returned_apart_keep_their_outputs(folders: dict[str, Any], tmp_path: Path) -> None:
    """`--decode-cache apart` returns new_kpe.N: now the rotated Split's piece, under the same name."""
    if folders["dtype"] != "bf16" or folders["8bit"]:
        pytest.skip("one dtype is enough")
    from dsv3c.passes.pipelines import DecodeCache

    export = folders["before"].parent / "export"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RopeTogetherPass, "call", _skipped)
        patch.setattr(HalfSoftmaxPass, "call", _skipped)
        before = lower_ort(export, tmp_path / "before", decode_cache=DecodeCache.APART)
    after = lower_ort(export, tmp_path / "after", decode_cache=DecodeCache.APART)
    outputs = [[v.name for v in ir.load(f / "decode.onnx").graph.outputs] for f in (before, after)]
    assert outputs[0] == outputs[1] and any(n.startswith("new_kpe.") for n in outputs[1])
    assert len(_ops(after, "RotaryEmbedding")) == mini_config(**PLAIN_Q).num_hidden_layers
    a, b = greedy_logits(before, steps=3), greedy_logits(after, steps=3)
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()
