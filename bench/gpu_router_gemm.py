"""What does the float32 router GEMM of a decode step cost on onnxruntime's CUDA EP, per weight layout?

    python bench/gpu_router_gemm.py [--hidden 2048] [--experts 64] [--rows 1 8 32] [--out FILE] [--commit C]

The ort lowering computes the router as DeepSeek does, in float32: MatMul(x, W) with W stored transposed,
[hidden, experts] (passes/transposed_weights.py). At one row cuBLAS runs that as a dot kernel and a
reduction, about 5 us for 0.5 MB. Each variant here is a graph of 26 such GEMMs (V2-Lite's MoE layers) of
one input, replayed as a CUDA graph; prints us per GEMM:

- matmul: MatMul(x, W [hidden, experts]) (the lowering's);
- gemm-trans-b: Gemm(x, W' [experts, hidden], transB=1);
- matmul-bf16: the same MatMul in bfloat16 (what a 16-bit router would cost; not DeepSeek's float32).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _bootstrap import import_dsv3c
from _gpu import no_cuda

import_dsv3c()

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from dsv3c.eval.record import run_record, write_result  # noqa: E402
from dsv3c.onnxkit.session import SessionSetup, import_ort, open_session  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

LAYERS = 26
VARIANTS = ("matmul", "gemm-trans-b", "matmul-bf16")


def _graph(variant: str, rows: int, hidden: int, experts: int) -> bytes:
    rng = np.random.default_rng(0)
    dtype = TensorProto.BFLOAT16 if variant == "matmul-bf16" else TensorProto.FLOAT
    nodes, weights = [], []
    x = "x"
    if variant == "matmul-bf16":
        nodes.append(helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.BFLOAT16))
        x = "x16"
    for i in range(LAYERS):
        w = rng.standard_normal((experts, hidden)).astype(np.float32) * 0.02
        if variant == "gemm-trans-b":
            weights.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("Gemm", [x, f"w{i}"], [f"y{i}"], transB=1))
        else:
            t = numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}")
            if variant == "matmul-bf16":
                t = helper.make_tensor(f"w{i}", TensorProto.BFLOAT16, t.dims, np.ascontiguousarray(w.T).ravel())
            weights.append(t)
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
    graph = helper.make_graph(
        nodes,
        "routers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, hidden])],
        [helper.make_tensor_value_info(f"y{i}", dtype, [rows, experts]) for i in range(LAYERS)],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return model.SerializeToString()


def _time(model: bytes, rows: int, hidden: int, rounds: int) -> float:
    """us per GEMM: the graph replayed `rounds` times as one CUDA graph."""
    import torch
    from dsv3c.runtime.ort_backend import ONNX_TYPES

    session = open_session(model, SessionSetup(device="cuda", cuda_options={"enable_cuda_graph": "1"}))
    x = torch.ones(rows, hidden, device="cuda")
    binding = session.io_binding()
    binding.bind_input("x", "cuda", 0, ONNX_TYPES[x.dtype], list(x.shape), x.data_ptr())
    outputs = []  # fixed addresses for the replays
    for out in session.get_outputs():
        dtype = torch.bfloat16 if out.type == "tensor(bfloat16)" else torch.float32
        outputs.append(torch.empty(out.shape, dtype=dtype, device="cuda"))
        t = outputs[-1]
        binding.bind_output(out.name, "cuda", 0, ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())
    for _ in range(3):
        session.run_with_iobinding(binding)
    binding.synchronize_outputs()
    start = time.perf_counter()
    for _ in range(rounds):
        session.run_with_iobinding(binding)
    binding.synchronize_outputs()
    return (time.perf_counter() - start) / rounds / LAYERS * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--out", type=Path)
    p.add_argument("--commit", default="", help="the commit run (a device's copy may carry an older .git)")
    args = p.parse_args()
    if no_cuda("gpu_router_gemm.py"):
        return 2
    rows = []
    for n in args.rows:
        for variant in VARIANTS:
            us = _time(_graph(variant, n, args.hidden, args.experts), n, args.hidden, args.rounds)
            rows.append({"variant": variant, "rows": n, "us_per_gemm": us})
            print(f"rows {n:3d} {variant:13s} {us:6.2f} us per GEMM", flush=True)
    if args.out:
        ort = import_ort()
        record = {**run_record(commit=args.commit), "onnxruntime": ort.__version__, "onnx": onnx.__version__}
        write_result(args.out, {**record, "hidden": args.hidden, "experts": args.experts, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
