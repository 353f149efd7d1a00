"""Do onnxruntime's CUDA com.microsoft::MoE and QMoE route as passes/moe_router_inputs.py relies on?

    python bench/gpu_moe_routing.py [--out FILE] [--commit C]

The contract (passes/moe_kernel_contract.py): router_probs softmaxed over all experts, the top k mixed with
those probabilities, renormalized over the k only with normalize_routing_weights=1. Each case is one node
run by the CUDA EP with no CPU fallback, against the same routing done by hand in float64 (QMoE against
its own dequantized weights; its 8-bit path rounds the activations to int8, about 1 %), and the CPU EP's
run of the same graph beside it. QMoE at 8-bit blocks of 32, 64 and 128 values, as `lower --weights-8bit`
stores them (CUDA's QMoE reads only packed weights: wrong outputs) and opened by onnxkit/session.py, which
packs them for the kernel with onnxruntime's own packer (SM80 layout). Prints the relative
error against the answer with and without renormalization: the smaller one says what the kernel did.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _bootstrap import import_dsv3c

import_dsv3c()

from dsv3c.eval.record import run_record, write_result  # noqa: E402
from dsv3c.onnxkit.session import SessionSetup, open_session  # noqa: E402
from dsv3c.passes.moe_kernel_contract import routing_case  # noqa: E402

# (op, dtype, 8-bit block, hidden, ff): CUDA's QMoE takes hidden sizes that are multiples of 64; the last
# are V2-Lite's expert shapes
CASES = [
    ("MoE", "float32", 32, 64, 64),
    ("MoE", "float16", 32, 64, 64),
    *(("QMoE", "float16", block, 128, 128) for block in (32, 64, 128)),
    ("MoE", "float16", 128, 2048, 1408),
    ("QMoE", "float16", 128, 2048, 1408),
]


def _session(model: bytes, provider: str = "CUDAExecutionProvider"):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    if provider != "CPUExecutionProvider":
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # a node CUDA lacks: an error
    return ort.InferenceSession(model, options, providers=[provider])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--commit", default="", help="the commit run (a device's copy may carry an older .git)")
    args = p.parse_args()
    rows = []
    for op, dtype, block, hidden, ff in CASES:
        for normalize in (0, 1):
            shape = {"block": block, "hidden": hidden, "ff": ff}
            case = routing_case(op, normalize, dtype, **shape)
            row: dict[str, object] = {"op": op, "dtype": dtype, "normalize": normalize, **shape}
            name = f"{op} {dtype} block {block} hidden {hidden} ff {ff} normalize={normalize}"
            try:
                got = _session(case.model).run(None, case.feeds)[0]
            except Exception as e:  # no CUDA kernel for this type
                rows.append({**row, "error": str(e).splitlines()[0]})
                print(f"{name}: {rows[-1]['error']}")
                continue
            answers = {n: routing_case(op, n, dtype, **shape) for n in (0, 1)}
            errors = {f"vs_normalize_{n}": answers[n].error(got) for n in (0, 1)}
            cpu = _session(case.model, "CPUExecutionProvider").run(None, case.feeds)[0]
            errors["cpu_ep_vs_normalize_0"], errors["cpu_ep_vs_normalize_1"] = (answers[n].error(cpu) for n in (0, 1))
            if op == "QMoE":  # opened as dsv3c opens it: the expert weights packed for the kernel at load
                packed = open_session(case.model, SessionSetup(device="cuda")).run(None, case.feeds)[0]
                errors["packed"] = case.error(packed)
                print(f"{name}: packed as the session opens: error {errors['packed']:.1e}", flush=True)
            rows.append({**row, **errors})
            print(
                f"{name}: error {errors['vs_normalize_0']:.1e} against the softmax over all, "
                f"{errors['vs_normalize_1']:.1e} against it renormalized (CPU EP: "
                f"{errors['cpu_ep_vs_normalize_0']:.1e}, {errors['cpu_ep_vs_normalize_1']:.1e})",
                flush=True,
            )
    if args.out:
        import onnx
        import onnxruntime as ort

        write_result(
            args.out,
            {**run_record(commit=args.commit), "onnxruntime": ort.__version__, "onnx": onnx.__version__, "rows": rows},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
