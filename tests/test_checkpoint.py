"""Checkpoint I/O: fp32/bf16/fp8 round trips, shards, block-fp8 edges, MTP names, clear errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from dsv3c.errors import CheckpointError
from dsv3c.models.checkpoint import (
    checkpoint_name,
    estimate_bytes,
    init_random,
    load_model,
    load_state_dict_streaming,
    module_name,
    random_state,
    save_model,
)
from dsv3c.models.checkpoint_layout import parameter_shapes
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3c.models.fp8 import dequantize_block_fp8, quantize_block_fp8
from dsv3c.models.rope import inv_frequencies
from safetensors import safe_open
from safetensors.torch import load_file, save_file

Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def model(tiny_config: DeepseekV3Config) -> DeepseekV3ForCausalLM:
    return init_random(tiny_config, seed=1)


def stored(folder: Path) -> Tensors:
    out: Tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def rewrite(folder: Path, edit: Callable[[Tensors], None]) -> None:
    """Edit a single-file checkpoint in place."""
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def same(a: Tensors, b: Tensors) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def raw(tensors: Tensors) -> Tensors:
    return {k: v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v for k, v in tensors.items()}


# ---- round trips ---------------------------------------------------------------------------------


def test_parameter_shapes_match_the_model(tiny_config: DeepseekV3Config) -> None:
    for config in (tiny_config, tiny_config.replace(tie_word_embeddings=True, q_lora_rank=None)):
        state = DeepseekV3ForCausalLM(config).state_dict()
        if config.tie_word_embeddings:
            del state["lm_head.weight"]
        assert parameter_shapes(config) == {k: tuple(v.shape) for k, v in state.items()}


def test_fp32_round_trip_is_exact(model: DeepseekV3ForCausalLM, tmp_path: Path) -> None:
    save_model(model, tmp_path / "ck")
    loaded = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "ck"))
    assert same(loaded.state_dict(), model.state_dict())
    assert torch.equal(loaded.inv_freq, inv_frequencies(model.config))  # recomputed after meta
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["torch_dtype"] == "float32"


def test_bf16_round_trip_keeps_the_router_bias_fp32(model: DeepseekV3ForCausalLM, tmp_path: Path) -> None:
    save_model(model, tmp_path / "ck", "bf16")
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert stored(tmp_path / "ck")[bias].dtype == torch.float32
    loaded = load_model(tmp_path / "ck", dtype=torch.bfloat16)
    for name, t in model.state_dict().items():
        want = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
        assert torch.equal(loaded.state_dict()[name], want), name


def test_fp8_round_trip_is_exact_and_stable(model: DeepseekV3ForCausalLM, tmp_path: Path) -> None:
    save_model(model, tmp_path / "a", "fp8")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    loaded = load_model(tmp_path / "a")
    files = stored(tmp_path / "a")
    for name in model.state_dict():
        key = checkpoint_name(name, model.config)
        if key + "_scale_inv" in files:  # load gives exactly the dequantized fp8
            want = dequantize_block_fp8(files[key], files[key + "_scale_inv"])
            assert torch.equal(loaded.state_dict()[name], want), name
    save_model(loaded, tmp_path / "b", "fp8")  # load -> save reproduces the bytes
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_fp8_goes_to_projections_only(model: DeepseekV3ForCausalLM, tmp_path: Path) -> None:
    save_model(model, tmp_path / "ck", "fp8")
    dtypes = {k: v.dtype for k, v in stored(tmp_path / "ck").items()}
    fp8 = [
        "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.experts.7.up_proj.weight",
        "model.layers.2.mlp.shared_experts.gate_proj.weight",
        "model.layers.3.self_attn.o_proj.weight",
    ]
    bf16 = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.3.eh_proj.weight",
        "model.layers.3.shared_head.head.weight",
        "model.layers.3.embed_tokens.weight",
    ]
    assert all(dtypes[k] == torch.float8_e4m3fn and dtypes[k + "_scale_inv"] == torch.float32 for k in fp8)
    assert all(dtypes[k] == torch.bfloat16 for k in bf16)
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == torch.float32


def test_partial_edge_blocks_against_numpy(tiny_config: DeepseekV3Config) -> None:
    w = init_random(tiny_config, seed=3).model.layers[0].self_attn.kv_a_proj_with_mqa.weight.detach()  # [80, 160]
    q, scale = quantize_block_fp8(w)
    assert scale.shape == (1, 2)  # ceil(80 / 128), ceil(160 / 128): the second block is 80 x 32
    q_np = q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    full = np.repeat(np.repeat(scale.numpy(), 128, axis=0), 128, axis=1)[:80, :160]
    assert np.array_equal(dequantize_block_fp8(q, scale).numpy(), q_np * full)
    amax = np.abs(w.numpy()).reshape(80, 1, 160).max(axis=(0, 1))
    np.testing.assert_allclose(scale[0].numpy(), [amax[:128].max() / 448, amax[128:].max() / 448], rtol=2e-7)
    assert np.abs(q_np * full - w.numpy()).max() <= np.abs(w.numpy()).max() / 16  # 3 mantissa bits


def test_foreign_fp8_grid_is_recovered_exactly() -> None:
    """Scales as DeepSeek writes them (amax / 448, not snapped) come back bit for bit."""
    torch.manual_seed(0)
    scale = torch.rand(8, 6).mul(30).sub(20).exp2()  # 4 of these 48 are not fixed points of _snap
    q = (torch.randn(8 * 16, 6 * 16 - 5) * 120).clamp(-448, 448).to(torch.float8_e4m3fn)
    q[::16, ::16] = 448.0
    q2, scale2 = quantize_block_fp8(dequantize_block_fp8(q, scale, (16, 16)), (16, 16))
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale2, scale)
    zero_q, zero_scale = quantize_block_fp8(torch.zeros(3, 5))
    assert torch.equal(zero_scale, torch.ones(1, 1)) and not zero_q.float().any()


def test_sharded_save_and_load(model: DeepseekV3ForCausalLM, tmp_path: Path) -> None:
    save_model(model, tmp_path / "ck", "fp8", max_shard_bytes=300_000)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "ck").glob("*.safetensors"))
    assert len(files) > 3 and sorted(set(index["weight_map"].values())) == files
    assert not (tmp_path / "ck" / "model.safetensors").exists()
    key = "model.layers.1.mlp.experts.0.gate_proj.weight"
    assert index["weight_map"][key] == index["weight_map"][key + "_scale_inv"]
    save_model(model, tmp_path / "single", "fp8")
    assert same(load_model(tmp_path / "ck").state_dict(), load_model(tmp_path / "single").state_dict())


def test_streaming_keeps_raw_fp8_under_our_names(model: DeepseekV3ForCausalLM, tmp_path: Path) -> None:
    save_model(model, tmp_path / "ck", "fp8", max_shard_bytes=300_000)
    streamed = dict(load_state_dict_streaming(tmp_path / "ck", keep_fp8=True))
    files = stored(tmp_path / "ck")
    assert same(raw(streamed), raw({module_name(k, model.config) or "": v for k, v in files.items()}))
    assert "mtp.0.block.self_attn.q_a_proj.weight_scale_inv" in streamed


# ---- names and MTP -------------------------------------------------------------------------------


def test_mtp_names(model: DeepseekV3ForCausalLM, tmp_path: Path) -> None:
    config = model.config
    for name in model.state_dict():
        assert module_name(checkpoint_name(name, config), config) == name
    save_model(model, tmp_path / "ck")
    names = set(stored(tmp_path / "ck"))
    assert not any(n.startswith("mtp.") for n in names)
    assert {
        "model.layers.3.enorm.weight",
        "model.layers.3.eh_proj.weight",
        "model.layers.3.embed_tokens.weight",
        "model.layers.3.shared_head.norm.weight",
        "model.layers.3.shared_head.head.weight",
        "model.layers.3.self_attn.q_a_proj.weight",
        "model.layers.3.mlp.experts.3.gate_proj.weight",
        "model.layers.3.input_layernorm.weight",
    } <= names


def test_missing_mtp_embed_and_head_are_copied(model: DeepseekV3ForCausalLM, tmp_path: Path) -> None:
    save_model(model, tmp_path / "ck")
    rewrite(
        tmp_path / "ck", lambda t: [t.pop(f"model.layers.3.{n}.weight") for n in ("embed_tokens", "shared_head.head")]
    )
    loaded = load_model(tmp_path / "ck")
    assert torch.equal(loaded.mtp[0].embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(loaded.mtp[0].shared_head["head"].weight, model.lm_head.weight)


def test_checkpoint_without_mtp_loads_main_model(
    model: DeepseekV3ForCausalLM, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_model(model, tmp_path / "ck")
    rewrite(tmp_path / "ck", lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.3.")])
    loaded = load_model(tmp_path / "ck")
    assert loaded.config.num_nextn_predict_layers == 0 and len(loaded.mtp) == 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_mtp_layers_beyond_the_config_are_ignored(
    model: DeepseekV3ForCausalLM, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_model(model, tmp_path / "ck")
    model.config.replace(num_nextn_predict_layers=0).save(tmp_path / "ck" / "config.json")
    assert len(load_model(tmp_path / "ck").mtp) == 0
    assert "ignoring" in capsys.readouterr().err


def test_tied_embeddings_and_ignorable_tensors(tiny_config: DeepseekV3Config, tmp_path: Path) -> None:
    model = init_random(tiny_config.replace(tie_word_embeddings=True), seed=2)
    save_model(model, tmp_path / "ck", "bf16")
    assert "lm_head.weight" not in stored(tmp_path / "ck")
    rewrite(tmp_path / "ck", lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    loaded = load_model(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_init_random_is_deterministic(tiny_config: DeepseekV3Config) -> None:
    a, b, c = (init_random(tiny_config, seed=s).state_dict() for s in (5, 5, 6))
    assert same(a, b) and not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert same(a, dict(random_state(tiny_config, seed=5)))  # the streaming form gives the same weights
    assert torch.equal(a["mtp.0.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert a["model.norm.weight"].eq(1).all() and a["model.layers.1.mlp.gate.e_score_correction_bias"].std() > 0.01


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_estimate_bytes_matches_saved_data(model: DeepseekV3ForCausalLM, tmp_path: Path, dtype: str) -> None:
    save_model(model, tmp_path / "ck", dtype)  # type: ignore[arg-type]
    data = sum(t.numel() * t.element_size() for t in stored(tmp_path / "ck").values())
    assert estimate_bytes(model.config, dtype) == data  # type: ignore[arg-type]


# ---- errors ------------------------------------------------------------------------------------


def fp8_without_scale(t: Tensors) -> None:
    del t["model.layers.0.self_attn.o_proj.weight_scale_inv"]


def wrong_shape(t: Tensors) -> None:
    t["model.norm.weight"] = torch.ones(7)


def missing(t: Tensors) -> None:
    for k in [k for k in t if k.startswith("model.layers.2.mlp.experts.")]:
        del t[k]


def unexpected(t: Tensors) -> None:
    t["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.ones(2, 2)


def truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def lost_shard(folder: Path) -> None:
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def only_pickles(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda f: rewrite(f, fp8_without_scale), ["o_proj.weight is F8_E4M3", "_scale_inv is missing"]),
        (lambda f: rewrite(f, wrong_shape), ["model.norm.weight has shape [7]", "implies [160]"]),
        (lambda f: rewrite(f, missing), ["24 tensors the config needs are missing", "layers.2.mlp.experts.0"]),
        (lambda f: rewrite(f, unexpected), ["1 tensors have no place", "layers.0.mlp.experts.0.gate_proj"]),
        (truncate, ["model.safetensors: unreadable safetensors", "download it again"]),
        (lost_shard, ["shard model-00002-of-00002.safetensors", "is missing"]),
        (only_pickles, ["no model.safetensors", "PyTorch pickles are not loaded"]),
        (lambda f: (f / "config.json").unlink(), ["no config.json"]),
    ],
)
def test_damaged_checkpoints_raise_clear_errors(
    model: DeepseekV3ForCausalLM, tmp_path: Path, damage: Callable[[Path], None], words: list[str]
) -> None:
    save_model(model, tmp_path / "ck", "fp8")
    damage(tmp_path / "ck")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "ck")
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "\n" not in str(e.value)


def test_bad_paths_raise_clear_errors(model: DeepseekV3ForCausalLM, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        load_model(tmp_path / "file")
    save_model(model, tmp_path / "ck", "bf16")
    with pytest.raises(CheckpointError, match="not empty"):
        save_model(model, tmp_path / "ck")
    save_model(model, tmp_path / "ck", overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers
    with safe_open(tmp_path / "ck" / "model.safetensors", "pt") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "F32"
