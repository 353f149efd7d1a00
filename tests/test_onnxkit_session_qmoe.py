"""A CUDA session packs QMoE's 8-bit expert weights as its kernel reads them (bench/gpu_moe_routing.py: the
rows as stored give wrong outputs on CUDA, packed ones agree with the CPU kernel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from dsv3c.errors import UserError
from dsv3c.onnxkit.session import cuda_qmoe_weight_names, cuda_qmoe_weights, pack_qmoe_experts
from dsv3c.passes.moe_kernel_contract import routing_case
from onnx import numpy_helper


def test_each_expert_is_a_permutation_of_its_stored_bytes() -> None:
    model = routing_case("QMoE", 1, "float16", hidden=128, ff=64).model
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(model).graph.initializer}
    packed = cuda_qmoe_weights(onnx.load_from_string(model), None)
    assert sorted(packed) == ["q1", "q2"] == cuda_qmoe_weight_names(onnx.load_from_string(model).graph)
    for name, w in packed.items():
        assert w.shape == stored[name].shape and w.dtype == np.uint8
        assert not np.array_equal(w, stored[name])  # reordered for the kernel
        for e in range(w.shape[0]):  # the same bytes: 8-bit packing moves values, rebias included, changes none
            assert np.array_equal(np.sort(w[e], axis=None), np.sort(stored[name][e], axis=None))


def test_nothing_to_pack_without_qmoe() -> None:
    model = routing_case("MoE", 1, "float16").model
    assert cuda_qmoe_weights(onnx.load_from_string(model), None) == {}


def test_a_shape_the_kernel_cannot_take_is_one_line() -> None:
    model = routing_case("QMoE", 1, "float16", hidden=32, ff=64).model  # fc1's K = hidden = 32
    with pytest.raises(UserError, match=r"^8bit\.onnx: QMoE weight q1 .*K a multiple of 64") as e:
        cuda_qmoe_weights(onnx.load_from_string(model), None, "8bit.onnx")
    assert "\n" not in str(e.value)


def test_all_experts_at_once_are_onnxruntimes_packer_one_matrix_at_a_time() -> None:
    from onnxruntime.quantization.cuda_quantizer import _pack_weights_for_cuda_mixed_gemm

    q = np.random.default_rng(0).integers(0, 256, (3, 64, 128), dtype=np.uint8)  # [E, N, K]
    one_by_one = [np.asarray(_pack_weights_for_cuda_mixed_gemm(q[e].copy(), 64, 128, 8, 80)) for e in range(3)]
    want = np.stack(one_by_one).view(np.uint8).reshape(q.shape)
    for chunk in (1, 2 * 64 * 128, 1 << 26):  # an expert a call, two, all three
        assert np.array_equal(pack_qmoe_experts(q, chunk), want)


@pytest.mark.parametrize("stored", ["embedded", "external"])
def test_the_packed_weights_are_what_the_session_reads(
    stored: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The plumbing, on the CPU kernel: a "cuda" session (its providers swapped for the CPU's) reads the
    weights cuda_qmoe_weights returns in place of the graph's, embedded (packed into the graph's bytes) or
    external (onnxruntime's external initializers): the stored ones give the CPU's outputs, others change them."""
    import dsv3c.onnxkit.session as session

    case = routing_case("QMoE", 1, "float16", hidden=128, ff=64)
    proto = onnx.load_from_string(case.model)
    rows = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    model: Path | bytes = case.model
    if stored == "external":
        model = tmp_path / "qmoe.onnx"
        onnx.save_model(proto, model, save_as_external_data=True, location="weights.bin", size_threshold=0)
    want = session.open_session(model).run(None, case.feeds)[0]
    monkeypatch.setattr(session, "providers_for", lambda device, options=None: [session.CPU_PROVIDER])
    for swap, same in ((False, True), (True, False)):
        weights = {n: rows[n][::-1].copy() if swap else rows[n] for n in ("q1", "q2")}  # experts reversed
        monkeypatch.setattr(session, "cuda_qmoe_weights", lambda proto, folder, label=None, w=weights: dict(w))
        got = session.open_session(model, session.SessionSetup(device="cuda")).run(None, case.feeds)[0]
        assert np.array_equal(got, want) == same


def test_a_float32_qmoe_runs_on_the_cpu_and_is_not_packed() -> None:
    model = routing_case("QMoE", 1, "float32", hidden=128, ff=64).model
    proto = onnx.load_from_string(model)
    assert any(n.op_type == "QMoE" for n in proto.graph.node) and cuda_qmoe_weights(proto, None) == {}


def test_a_folder_packed_once_is_not_packed_again_until_its_weights_change(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A decoder opens a session per (batch, capacity) bucket: the second reuses the first's packed weights;
    a rewritten weights file (another mtime) is packed anew; embedded weights are always packed."""
    import os

    import dsv3c.onnxkit.session as session

    calls = []
    real = session.pack_qmoe_experts
    monkeypatch.setattr(session, "pack_qmoe_experts", lambda q: calls.append(q.shape) or real(q))
    model = routing_case("QMoE", 1, "float16", hidden=128, ff=64).model
    path = tmp_path / "qmoe.onnx"
    onnx.save_model(
        onnx.load_from_string(model), path, save_as_external_data=True, location="weights.bin", size_threshold=0
    )

    def pack() -> dict[str, np.ndarray]:
        return cuda_qmoe_weights(onnx.load(path, load_external_data=False), tmp_path)

    first = pack()
    assert len(calls) == 2
    again = pack()
    assert len(calls) == 2 and all(again[n] is first[n] for n in first)
    weights = tmp_path / "weights.bin"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed = pack()
    assert len(calls) == 4 and all(np.array_equal(changed[n], first[n]) for n in first)
    cuda_qmoe_weights(onnx.load_from_string(model), None)  # embedded
    assert len(calls) == 6
