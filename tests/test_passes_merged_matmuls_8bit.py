"""MatMulNBits of one activation merge into one (passes/merged_matmuls.py): the 8-bit rows and scales of
the parts stacked, a Split after it (absorbing a part's own Split), and the same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
from dsv3c.artifact.names import MERGED_JOIN
from dsv3c.passes.lower_ort_8bit import quantize_rows
from dsv3c.passes.merged_matmuls import MergedMatMulsPass, merged_parts
from dsv3c.passes.ort_run import GraphRunner
from onnx import TensorProto, helper, numpy_helper

K, BLOCK = 64, 32
WIDTHS = {"w1": 48, "w2": 24}  # w2's output is split in 16 + 8, as kv_a_proj's latent and RoPE parts


def _model(blocks: tuple[int, int] = (BLOCK, BLOCK)) -> ir.Model:
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    for (name, n), block in zip(WIDTHS.items(), blocks, strict=True):
        q, s = quantize_rows(rng.standard_normal((n, K)).astype(np.float32), block)
        inits += [numpy_helper.from_array(q, f"{name}_q8"), numpy_helper.from_array(s, f"{name}_q8_scales")]
        out = "y1" if name == "w1" else "y2"
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["x", f"{name}_q8", f"{name}_q8_scales"],
                [out],
                domain="com.microsoft",
                name=f"{name}_nbits",
                K=K,
                N=n,
                bits=8,
                block_size=block,
                accuracy_level=4,
            )
        )
    inits.append(numpy_helper.from_array(np.array([16, 8], np.int64), "sizes"))
    nodes.append(helper.make_node("Split", ["y2", "sizes"], ["a", "b"], axis=-1))
    nodes += [helper.make_node("Relu", [v], [f"{v}_out"]) for v in ("y1", "a", "b")]
    outputs = [helper.make_tensor_value_info(f"{v}_out", TensorProto.FLOAT, None) for v in ("y1", "a", "b")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])], outputs, inits
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    proto.graph.value_info.extend(  # shapes as the exporter declares them: the Split reads a known rank
        helper.make_tensor_value_info(v, TensorProto.FLOAT, [3, n]) for v, n in (("y1", 48), ("y2", 24))
    )
    return ir.serde.deserialize_model(proto)


def test_matmul_nbits_of_one_activation_merge_with_the_same_outputs(tmp_path: Path) -> None:
    x = {"x": np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)}
    before = GraphRunner(_model(), tmp_path / "before").run(x)
    model = _model()
    parts = {name: model.graph.initializers[name].const_value.numpy() for name in model.graph.initializers}  # type: ignore[union-attr]
    MergedMatMulsPass()(model)
    nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == 1 and nbits[0].attributes["N"].as_int() == sum(WIDTHS.values())
    splits = [n for n in model.graph if n.op_type == "Split"]
    assert len(splits) == 1 and len(splits[0].outputs) == 3  # w2's own Split joined the merged one
    weight, scales = nbits[0].inputs[1], nbits[0].inputs[2]
    assert weight is not None and scales is not None and weight.name is not None and scales.name is not None
    assert MERGED_JOIN in weight.name
    for value in (weight, scales):
        want = np.concatenate([parts[name] for name in merged_parts(value.name or "")])
        np.testing.assert_array_equal(value.const_value.numpy(), want)  # type: ignore[union-attr]
    assert not set(model.graph.initializers) & set(parts) - {"sizes"}  # the parts' own weights are gone
    after = GraphRunner(model, tmp_path / "after").run(x)
    for name, want in before.items():
        np.testing.assert_allclose(after[name], want, rtol=1e-6, atol=1e-6)


def test_matmul_nbits_of_other_layouts_stay_apart() -> None:
    """Rows quantized in blocks of another size are another layout: no merge."""
    model = _model(blocks=(BLOCK, BLOCK // 2))
    MergedMatMulsPass()(model)
    assert len([n for n in model.graph if n.op_type == "MatMulNBits"]) == 2
