"""Does onnxruntime's CUDA Softmax of 16-bit scores compute what the float32 softmax between Casts computes?

    python bench/gpu_half_softmax.py [--lengths 1 64 1000 1024 1025 4096 16384] [--rows 16 128] [--out FILE]
                                     [--commit C]

passes/ort_half_softmax.py rests on it: attention's masked softmax, as DeepSeek writes it (widen the bf16
scores, mask, float32 softmax, round to bf16), against the same on the 16-bit scores (mask, Softmax),
each an ONNX graph of its own run by the CUDA EP with no CPU fallback allowed and no graph optimization
(every node runs as written). Scores are random (std 4, a quarter of each row masked) and already on the
16-bit grid, fed and read as float32 through exact Casts. Prints, per type, row count and row length, how
many probabilities differ and by how many units in the last place (0: the same bits).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _bootstrap import import_dsv3c

import_dsv3c()

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from dsv3c.eval.record import run_record, write_result  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

TYPES = {"bf16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16), "fp16": (TensorProto.FLOAT16, np.float16)}


def _graph(half: int, in_float32: bool) -> bytes:
    """x (float32 on the half grid), visible -> softmax probabilities rounded to `half`, as float32."""
    fill_type = TensorProto.FLOAT if in_float32 else half
    nodes = [
        helper.make_node("Cast", ["x"], ["s"], to=half),
        helper.make_node("Constant", [], ["fill"], value=helper.make_tensor("f", fill_type, [], [float("-inf")])),
    ]
    if in_float32:
        nodes.append(helper.make_node("Cast", ["s"], ["wide"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Where", ["visible", "wide", "fill"], ["masked"]))
        nodes.append(helper.make_node("Softmax", ["masked"], ["p32"], axis=-1))
        nodes.append(helper.make_node("Cast", ["p32"], ["p"], to=half))
    else:
        nodes.append(helper.make_node("Where", ["visible", "s", "fill"], ["masked"]))
        nodes.append(helper.make_node("Softmax", ["masked"], ["p"], axis=-1))
    nodes.append(helper.make_node("Cast", ["p"], ["y"], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes,
        "softmax",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "h", 1, "l"]),
            helper.make_tensor_value_info("visible", TensorProto.BOOL, ["b", 1, 1, "l"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "h", 1, "l"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)  # what ort 1.31 reads
    return model.SerializeToString()


def _session(model: bytes):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # a node CUDA lacks: an error
    return ort.InferenceSession(model, options, providers=["CUDAExecutionProvider"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 64, 1000, 1024, 1025, 4096, 16384])
    p.add_argument("--rows", type=int, nargs="+", default=[16, 128], help="batch x heads")
    p.add_argument("--out", type=Path)
    p.add_argument("--commit", default="", help="the commit run (a device's copy may carry an older .git)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for name, (half, numpy_type) in TYPES.items():
        try:
            sessions = [_session(_graph(half, in_float32)) for in_float32 in (True, False)]
        except Exception as e:  # the type's Softmax has no CUDA kernel
            print(f"{name}: {str(e).splitlines()[0]}")
            rows.append({"type": name, "error": str(e).splitlines()[0]})
            continue
        for count in args.rows:
            for length in args.lengths:
                x = (rng.standard_normal((count // 16, 16, 1, length)) * 4).astype(numpy_type).astype(np.float32)
                visible = np.ones((count // 16, 1, 1, length), bool)
                visible[..., : length // 4] = False  # a quarter of each row masked
                wide, narrow = (s.run(None, {"x": x, "visible": visible})[0] for s in sessions)
                bits = [a.astype(numpy_type).view(np.uint16).astype(np.int32) for a in (wide, narrow)]
                ulps = np.abs(bits[0] - bits[1])
                row = {
                    "type": name,
                    "rows": count,
                    "length": length,
                    "differing": int((ulps > 0).sum()),
                    "max_ulps": int(ulps.max()),
                    "max_abs_difference": float(np.abs(wide - narrow).max()),
                }
                print(
                    f"{name} rows {count} length {length}: {row['differing']} of {x.size} differ, "
                    f"at most {row['max_ulps']} ulp ({row['max_abs_difference']:.1e})",
                    flush=True,
                )
                rows.append(row)
    if args.out:
        import onnxruntime as ort

        write_result(
            args.out,
            {**run_record(commit=args.commit), "onnxruntime": ort.__version__, "onnx": onnx.__version__, "rows": rows},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
