"""A QMoE graph is refused on CUDA (its kernel reads weights packed for the GPU, which `lower --weights-8bit`
does not write: bench/gpu_moe_routing.py measured wrong outputs), before onnxruntime is asked."""

from __future__ import annotations

import pytest
from dsv3c.errors import UserError
from dsv3c.onnxkit.session import TIME_UNPACKED_QMOE, SessionSetup, has_qmoe, open_session
from dsv3c.passes.moe_kernel_contract import routing_case


def test_qmoe_on_cuda_is_one_line_saying_why(monkeypatch: pytest.MonkeyPatch) -> None:
    qmoe, moe = routing_case("QMoE", 1, "float16").model, routing_case("MoE", 1, "float16").model
    assert has_qmoe(qmoe) and not has_qmoe(moe)
    monkeypatch.delenv(TIME_UNPACKED_QMOE, raising=False)
    with pytest.raises(UserError, match=r"^8bit\.onnx has com\.microsoft::QMoE .*--device cpu") as e:
        open_session(qmoe, SessionSetup(device="cuda"), label="8bit.onnx")
    assert "\n" not in str(e.value)
    open_session(qmoe)  # the CPU kernel reads these rows


def test_benchmarks_may_time_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TIME_UNPACKED_QMOE, "1")
    try:
        open_session(routing_case("QMoE", 1, "float16").model, SessionSetup(device="cuda"))
    except UserError as e:  # this machine's onnxruntime has no CUDA provider: refused for that, not for QMoE
        assert "QMoE" not in str(e)
