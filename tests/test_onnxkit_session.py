"""onnxkit.session: the one session setup runs a graph from a file or bytes, reads an in-memory graph's external
weights from its folder, applies its options, and turns every failure into one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from dsv3c.errors import UserError
from dsv3c.onnxkit.session import SessionSetup, cuda_available, open_session, providers_for
from onnx import TensorProto, helper, numpy_helper


def _add_model(weight: np.ndarray, batch: str | int = "batch") -> onnx.ModelProto:
    """y = x + w, with x [batch, 4] and a weight initializer w [4]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    node = helper.make_node("Add", ["x", "w"], ["y"], name="add")
    graph = helper.make_graph([node], "add", [x], [y], [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save_external(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "add.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    return path


W = np.arange(4, dtype=np.float32)
X = np.ones((3, 4), np.float32)


def test_a_file_runs(tmp_path: Path) -> None:
    path = _save_external(_add_model(W), tmp_path)
    (y,) = open_session(path).run(None, {"x": X})
    np.testing.assert_array_equal(y, X + W)


def test_bytes_read_external_weights_from_the_folder(tmp_path: Path) -> None:
    path = _save_external(_add_model(W), tmp_path)
    data = onnx.load(path, load_external_data=False).SerializeToString()  # refers to w.bin, not holding it
    (y,) = open_session(data, SessionSetup(weights_folder=tmp_path)).run(None, {"x": X})
    np.testing.assert_array_equal(y, X + W)


def test_options_reach_onnxruntime() -> None:
    import onnxruntime as ort

    data = _add_model(W).SerializeToString()
    session = open_session(data, SessionSetup(optimization="none", threads=1, fixed_dims={"batch": 3}))
    options = session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.intra_op_num_threads == 1 and options.log_severity_level == 3
    assert session.get_inputs()[0].shape == [3, 4]  # the symbolic batch fixed at load
    assert (
        open_session(data).get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )


def test_a_graph_onnxruntime_rejects_is_one_line() -> None:
    bad = _add_model(W)
    bad.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(UserError, match=r"^mine: onnxruntime cannot load this graph: ") as info:
        open_session(bad.SerializeToString(), label="mine")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="onnxruntime cannot load"):
        open_session(b"not a model")


def test_a_truncated_weights_file_is_caught_before_onnxruntime(tmp_path: Path) -> None:
    path = _save_external(_add_model(W), tmp_path)
    (tmp_path / "w.bin").write_bytes(b"\0" * 4)  # 4 of the 16 bytes
    with pytest.raises(UserError, match=r"past the end of w\.bin"):
        open_session(path)
    with pytest.raises(UserError, match="no such ONNX file"):
        open_session(tmp_path / "missing.onnx")


def test_bad_setups_are_user_errors() -> None:
    with pytest.raises(UserError, match="unknown onnxruntime device 'tpu'"):
        providers_for("tpu")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="unknown graph optimization"):
        SessionSetup(optimization="max")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="threads"):
        SessionSetup(threads=-1)
    with pytest.raises(UserError, match="CUDA provider options"):
        SessionSetup(cuda_options={"enable_cuda_graph": "1"})


@pytest.mark.skipif(cuda_available(), reason="onnxruntime-gpu is installed")
def test_cuda_without_onnxruntime_gpu_says_what_to_install() -> None:
    with pytest.raises(UserError, match="needs onnxruntime-gpu"):
        open_session(_add_model(W).SerializeToString(), SessionSetup(device="cuda"))
