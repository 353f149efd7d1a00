"""The exported tiny graphs in onnxruntime against the PyTorch model: prefill, greedy decode, ragged batches, MTP."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from dsv3c.export.exporter import export
from dsv3c.export.source import from_config
from dsv3c.models.checkpoint import init_random
from dsv3c.models.config import DeepseekV3Config

from .test_export_common import Exported, exported_tiny, rel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return exported_tiny(tmp_path_factory)


def arange_positions(batch: int, start: int, count: int) -> np.ndarray:
    return np.tile(np.arange(start, start + count, dtype=np.int64), (batch, 1))


def cache_feeds(outputs: dict[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    return {f"past_{k}.{i}": outputs[f"new_{k}.{i}"] for i in range(layers) for k in ("ckv", "kpe")}


def run(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


@torch.no_grad()
def test_prefill_matches_pytorch(tiny: Exported) -> None:
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = tiny.model(ids)
    out = run(tiny.session("prefill"), {"input_ids": ids.numpy(), "positions": arange_positions(2, 0, 7)})
    assert rel(out["logits"], ref.logits.numpy()) < 1e-4
    assert rel(out["hidden"], ref.hidden_states.numpy()) < 1e-4
    for i, new in enumerate(ref.new_cache):
        assert rel(out[f"new_ckv.{i}"], new.ckv.numpy()) < 1e-4
        assert rel(out[f"new_kpe.{i}"], new.kpe.numpy()) < 1e-4


@torch.no_grad()
def test_sixteen_greedy_decode_steps_reproduce_pytorch(tiny: Exported) -> None:
    prompt = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(1))
    ids = prompt
    for _ in range(16):  # PyTorch: full recompute every step
        ids = torch.cat([ids, tiny.model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    layers = tiny.model.config.num_hidden_layers
    out = run(tiny.session("prefill"), {"input_ids": prompt.numpy(), "positions": arange_positions(2, 0, 5)})
    cache = cache_feeds(out, layers)
    tokens = [out["logits"][:, -1].argmax(-1)]
    decode = tiny.session("decode")
    for step in range(15):
        feeds = {"input_ids": tokens[-1][:, None], "positions": arange_positions(2, 5 + step, 1), **cache}
        out = run(decode, feeds)
        cache = {k: np.concatenate([v, out[k.replace("past_", "new_")]], axis=1) for k, v in cache.items()}
        tokens.append(out["logits"][:, -1].argmax(-1))
    assert np.stack(tokens, axis=1).tolist() == ids[:, 5:].tolist()


@torch.no_grad()
def test_ragged_batch_of_three_right_padded_then_two_token_decode(tiny: Exported) -> None:
    """Rows of 3, 7 and 5 prompt tokens padded to 7; then 2 new tokens per row (as MTP verification does)."""
    lengths, width = [3, 7, 5], 7
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 512, (n + 2,), generator=g) for n in lengths]  # prompt + 2 later tokens
    prompt = np.zeros((3, width), dtype=np.int64)
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        prompt[b, :n] = row[:n].numpy()  # the padding is token 0 at positions n..6: invisible to real tokens
    pre = run(tiny.session("prefill"), {"input_ids": prompt, "positions": arange_positions(3, 0, width)})
    step_ids = np.stack([row[n : n + 2].numpy() for row, n in zip(rows, lengths, strict=True)])
    positions = np.array([[n, n + 1] for n in lengths], dtype=np.int64)
    feeds = {"input_ids": step_ids, "positions": positions, **cache_feeds(pre, tiny.model.config.num_hidden_layers)}
    dec = run(tiny.session("decode"), feeds)  # past: the padded prefill buffer, valid [0, n) per row
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        ref = tiny.model(row[None]).logits[0].numpy()
        assert rel(pre["logits"][b, :n], ref[:n]) < 1e-4
        assert rel(dec["logits"][b], ref[n : n + 2]) < 1e-4


@torch.no_grad()
def test_mtp_graph_matches_forward_mtp_with_and_without_past(tiny: Exported) -> None:
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    hidden = tiny.model(ids[:, :-1]).hidden_states  # [2, 8, D]
    ref_logits, ref_hidden, ref_new = tiny.model.forward_mtp(ids[:, 1:], hidden)
    mtp = tiny.session("mtp")
    config = tiny.model.config
    empty = {
        "past_ckv.0": np.zeros((2, 0, config.kv_lora_rank), np.float32),
        "past_kpe.0": np.zeros((2, 0, config.qk_rope_head_dim), np.float32),
    }
    whole = run(
        mtp, {"next_ids": ids[:, 1:].numpy(), "hidden": hidden.numpy(), "positions": arange_positions(2, 0, 8), **empty}
    )
    assert rel(whole["logits"], ref_logits.numpy()) < 1e-4
    assert rel(whole["hidden_out"], ref_hidden.numpy()) < 1e-4
    assert rel(whole["new_ckv.0"], ref_new.ckv.numpy()) < 1e-4
    first = run(
        mtp,
        {
            "next_ids": ids[:, 1:6].numpy(),
            "hidden": hidden[:, :5].numpy(),
            "positions": arange_positions(2, 0, 5),
            **empty,
        },
    )
    past = {"past_ckv.0": first["new_ckv.0"], "past_kpe.0": first["new_kpe.0"]}
    rest = run(
        mtp,
        {
            "next_ids": ids[:, 6:].numpy(),
            "hidden": hidden[:, 5:].numpy(),
            "positions": arange_positions(2, 5, 3),
            **past,
        },
    )
    assert rel(rest["logits"], ref_logits[:, 5:].numpy()) < 1e-4


@torch.no_grad()
def test_v2_lite_shaped_config_with_tied_embeddings(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Plain q_proj, softmax greedy routing without bias, tied head, no MTP; random weights = init_random's."""
    config = DeepseekV3Config.from_preset("tiny").replace(
        q_lora_rank=None,
        scoring_func="softmax",
        topk_method="greedy",
        norm_topk_prob=False,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        num_nextn_predict_layers=0,
        tie_word_embeddings=True,
    )
    out = tmp_path_factory.mktemp("variant") / "out"
    manifest = export(from_config(config, "v2-lite-like"), out, weights="random", seed=4)
    assert manifest.graphs["mtp"] is None and not (out / "mtp.onnx").exists()
    names = {t.name for t in manifest.load_structure("prefill").graph.initializer}
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: stored once
    ids = torch.randint(0, 512, (3, 6), generator=torch.Generator().manual_seed(5))
    session = ort.InferenceSession(str(out / "prefill.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input_ids": ids.numpy(), "positions": arange_positions(3, 0, 6)})[0]
    assert rel(logits, init_random(config, seed=4)(ids).logits.numpy()) < 1e-4
