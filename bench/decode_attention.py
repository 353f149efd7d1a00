"""Decode attention alone: one absorbed MLAAttention step (the canonical function body) on onnxruntime CPU.

    python bench/decode_attention.py [--heads 16] [--contexts 128 4096 16384] [--out bench/results/x.json]

Times one new token attending over a latent cache of `context` entries (DeepSeek-V3's widths by default:
kv_lora_rank 512, rope 64, nope 128, v 128), and reports the cache bytes read, the rate achieved, and the
GEMM work (2 x heads x (rank + rope) + 2 x heads x rank multiply-adds per cached entry): absorbed MLA does
about 4 x heads FLOPs per cache byte, so on a CPU it is bound by compute long before by bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from _bootstrap import import_dsv3c

import_dsv3c()

import numpy as np  # noqa: E402
from dsv3c.eval.record import run_record, write_result  # noqa: E402
from dsv3c.export.functions import mla_function  # noqa: E402
from dsv3c.export.onnx_ops import DOMAIN, MLA_OP  # noqa: E402
from dsv3c.onnxkit.session import open_session  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

OPSET = 21
INPUTS = ("q_nope", "q_pe", "ckv", "kpe", "wkv_b")


def session(heads: int, nope: int, rope: int, v: int, rank: int) -> Any:
    attrs = dict(num_heads=heads, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v, kv_lora_rank=rank)
    node = helper.make_node(MLA_OP, [*INPUTS, "positions"], ["out"], domain=DOMAIN, softmax_scale=0.07, **attrs)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in INPUTS]
    inputs.append(helper.make_tensor_value_info("positions", TensorProto.INT64, None))
    graph = helper.make_graph(
        [node], "attention", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[mla_function(True, OPSET)], ir_version=10)
    return open_session(model.SerializeToString(), label="decode attention")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--rank", type=int, default=512)
    p.add_argument("--rope", type=int, default=64)
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 4096, 16384])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    nope = v = 128
    s = session(args.heads, nope, args.rope, v, args.rank)
    rng = np.random.default_rng(0)
    rows = []
    for ctx in args.contexts:
        feeds = {
            "q_nope": rng.standard_normal((1, 1, args.heads, nope), np.float32),
            "q_pe": rng.standard_normal((1, 1, args.heads, args.rope), np.float32),
            "ckv": rng.standard_normal((1, ctx, args.rank), np.float32),
            "kpe": rng.standard_normal((1, ctx, args.rope), np.float32),
            "wkv_b": rng.standard_normal((args.heads * (nope + v), args.rank), np.float32) * 0.05,
            "positions": np.array([[ctx - 1]], np.int64),
        }
        s.run(None, feeds)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            s.run(None, feeds)
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        cache = ctx * (args.rank + args.rope) * 4
        flops = 2 * ctx * args.heads * (2 * args.rank + args.rope)
        row = {"context": ctx, "ms": seconds * 1e3, "cache_mb": cache / 1e6, "gb_per_s": cache / seconds / 1e9}
        row["gflop_per_s"] = flops / seconds / 1e9
        rows.append(row)
        print(
            f"context {ctx:6d}: {row['ms']:7.2f} ms, cache {row['cache_mb']:6.1f} MB at {row['gb_per_s']:5.2f} GB/s, "
            f"{row['gflop_per_s']:5.1f} GFLOP/s",
            flush=True,
        )
    if args.out is not None:
        write_result(
            args.out, {**run_record(), "heads": args.heads, "rank": args.rank, "rope": args.rope, "rows": rows}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
