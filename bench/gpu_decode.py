"""GPU decode benchmark: onnxruntime's CUDA EP (captured CUDA graphs, and without) vs PyTorch eager and
transformers on the same GPU, side by side in one run, against the memory-bandwidth floor.

Here (CPU machine), write `lower --target ort` folders without weights (a few MB each, easy to carry;
`bench/decode_gpu.sh folders` does this into runs/gpu, and its `small` and `v2-lite` modes run the GPU round):

    dsv3c export --preset small --weights none --out gpu/small-canon
    dsv3c lower gpu/small-canon --target ort --out gpu/small
    dsv3c export --preset v2-lite --weights none --dtype bf16 --out gpu/v2-lite-canon
    dsv3c lower gpu/v2-lite-canon --target ort --out gpu/v2-lite
    dsv3c lower gpu/v2-lite-canon --target ort --weights-8bit --out gpu/v2-lite-8bit   # MatMulNBits + QMoE

On the GPU machine (onnxruntime-gpu installed in place of onnxruntime, see README "Optional backends"; torch with CUDA):

    python bench/gpu_decode.py gpu/small gpu/v2-lite gpu/v2-lite-8bit --out gpu.json

A `--weights none` folder is filled with random weights in place first, drawn on the GPU
(bench/fill_random_weights.py; 8-bit weights as uniform bytes whose scales give the float weights' std).
PyTorch and transformers run the same shapes with their own random
weights made on the GPU (speed does not depend on the values).

Every cell (model, runtime, batch, context) times `--steps` greedy decode steps, one token per row each,
over a latent cache of `context` valid slots (their values random: attention costs the same whatever
they hold), the next ids taken on the device (argmax) so that nothing waits for the host between steps;
ms/token is the step time. The floor is the bytes a step must read over the device's measured copy
bandwidth: every dense weight as stored, the routed experts the batch can reach (the expected number of
distinct experts among batch x top_k uniform choices), and batch x context cache entries.

    ort-graph   decode.onnx with static shapes per (batch, capacity), replayed as a CUDA graph
    ort-static  the same session without capture (what the capture saves)
    ort         the dynamic-shape runtime (runtime/ort_backend.py), one synchronizing run per step
    torch       our PyTorch model, eager, absorbed MLA over the latent cache
    transformers  transformers' DeepseekV3/V2ForCausalLM, eager attention, its DynamicCache (expanded K/V)

Each runtime of each folder runs in a process of its own (`--in-process` keeps one): onnxruntime aborts the
process on some CUDA errors, and a runtime's memory goes back to the device when its process ends. The
results file is rewritten after every cell. H200, onnxruntime-gpu 1.31.1 (December 2026): every cell runs,
batch 32 included, since StaticDecoder makes six uncaptured runs before its capture (two were not enough
for V2-Lite: bench/capture_variants.py); a bf16 V2-Lite session opens in 5-7 s.

A folder with QMoE nodes (`--weights-8bit`) has its expert weights packed for CUDA's kernel as the session
opens (onnxkit/session.py); `DSV3C_UNPACKED_QMOE=1` times the rows as stored instead (wrong outputs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _bootstrap import import_dsv3c
from _capture_settings import CAPTURE_SETTINGS
from _gpu import fill_if_weightless, no_cuda

RUNTIMES = ("ort-graph", "ort-static", "ort", "torch", "transformers")


def random_model(config: Any, dtype: Any, device: str, seed: int = 0) -> Any:
    """Our PyTorch model with N(0, 0.02) weights (ones for norms) made directly on `device`."""
    import torch
    from dsv3c.models.checkpoint_layout import assign_parameter, finish_model
    from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        if name.endswith("norm.weight"):
            tensor = torch.ones(p.shape, dtype=dtype, device=device)
        elif name.endswith("e_score_correction_bias"):
            tensor = torch.zeros(p.shape, dtype=torch.float32, device=device)
        else:
            tensor = torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
        assign_parameter(model, name, tensor)
    return finish_model(model).to(device).eval()


def hf_model(config: Any, dtype: Any, device: str) -> Any:
    """transformers' model of the config's architecture, random weights made on the GPU, eager attention."""
    import torch
    import transformers

    v2 = config.to_dict().get("model_type") == "deepseek_v2"
    names = ("DeepseekV2Config", "DeepseekV2ForCausalLM") if v2 else ("DeepseekV3Config", "DeepseekV3ForCausalLM")
    hf_config = getattr(transformers, names[0])(**config.to_dict())
    hf_config._attn_implementation = "eager"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, names[1])(hf_config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def weight_bytes(manifest: Any, batch: int) -> tuple[int, float]:
    """(weight bytes a decode step must read as stored, distinct routed experts expected): dense weights,
    the looked-up embedding rows, and the experts reached by batch x top_k uniform choices (the expected
    count, where `dsv3c bench` takes the upper bound min(E, batch x top_k))."""
    from dsv3c.models.config import DeepseekV3Config
    from dsv3c.runtime.bench.memory import stored_weight_bytes

    config = DeepseekV3Config.from_dict(manifest.config)
    dense, embed, experts = stored_weight_bytes(manifest, "decode")
    n, k = config.n_routed_experts or 1, config.num_experts_per_tok or 0
    distinct = n * (1 - (1 - k / n) ** batch) if k else 0.0
    return int(dense + embed * batch / config.vocab_size + experts * distinct / n), distinct


def time_steps(step: Callable[[Any, Any], Any], ids: Any, positions: Any, steps: int, warm: int = 3) -> float:
    """Seconds per step of `steps` greedy steps after `warm` untimed ones; ids on the device throughout."""
    import torch

    for _ in range(warm):
        logits = step(ids, positions)
        ids = logits[:, -1].argmax(-1, keepdim=True)
        positions = positions + 1
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        logits = step(ids, positions)
        ids = logits[:, -1].argmax(-1, keepdim=True)
        positions = positions + 1
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def fill_cache(buffers: Any, context: int, seed: int) -> None:
    import torch

    generator = torch.Generator(device=buffers.device).manual_seed(seed)
    for tensor in (*buffers.ckv, *buffers.kpe):
        tensor[:, :context].normal_(0.0, 1.0, generator=generator)


def measure_cell(
    runtime: str, folder: Path, made: dict[str, Any], batch: int, context: int, args: argparse.Namespace
) -> dict[str, Any]:
    import torch
    from dsv3c.runtime.ort_backend import OrtEngine
    from dsv3c.runtime.ort_cuda_graph import StaticDecoder
    from dsv3c.runtime.torch_backend import TorchEngine

    capacity = context + args.steps + 8
    vocab = made["config"].vocab_size
    ids = torch.randint(0, vocab, (batch, 1), device="cuda")
    positions = torch.full((batch, 1), context, dtype=torch.long, device="cuda")
    extra: dict[str, Any] = {}
    if runtime in ("ort-graph", "ort-static"):
        # the first captured cell says where the nodes run (its timed replays run no profiled nodes)
        profile = runtime == "ort-graph" and f"placement {runtime}" not in made
        made.setdefault(f"placement {runtime}", None)
        start = time.perf_counter()
        settings = CAPTURE_SETTINGS[args.capture_settings]
        decoder = StaticDecoder(folder, batch, capacity, cuda_graph=runtime == "ort-graph", profile=profile, **settings)
        extra["session_load_s"] = time.perf_counter() - start
        fill_cache(decoder.cache, context, args.seed)
        seconds = time_steps(decoder.step, ids, positions, args.steps)
        if profile:
            made[f"placement {runtime}"] = extra["placement"] = decoder.placement().to_dict()
            print(f"{folder.name} {runtime}: nodes by provider {extra['placement']}", flush=True)
        extra["capacity"] = decoder.capacity
        del decoder
        gc.collect()  # its session's arena goes before the next cell's session loads
    elif runtime == "ort":
        engine = made.get("ort") or OrtEngine(folder, "cuda", roles=("decode",))
        made["ort"] = engine
        engine.start(batch, capacity)
        fill_cache(engine.cache, context, args.seed)
        seconds = time_steps(lambda i, p: engine.decode(i, p).logits, ids, positions, args.steps)
    elif runtime == "torch":
        if "torch" not in made:
            made["torch"] = TorchEngine(random_model(made["config"], made["dtype"], "cuda", args.seed))
        engine = made["torch"]
        engine.start(batch, capacity)
        fill_cache(engine._cache(positions), context, args.seed)
        seconds = time_steps(lambda i, p: engine.decode(i, p).logits, ids, positions, args.steps)
    else:
        if "transformers" not in made:
            made["transformers"] = hf_model(made["config"], made["dtype"], "cuda")
        model = made["transformers"]
        with torch.inference_mode():
            # one real token makes the cache object; its layers then get `context` random entries (a prefill
            # of batch x context tokens through eager attention would cost more than the whole benchmark)
            cache = model(input_ids=ids, use_cache=True).past_key_values
            for layer in cache.layers:
                b, h, _, width = layer.keys.shape
                layer.keys = torch.randn(b, h, context, width, dtype=layer.keys.dtype, device="cuda")
                layer.values = torch.randn(
                    b, h, context, layer.values.shape[-1], dtype=layer.values.dtype, device="cuda"
                )

            def hf_step(i: Any, p: Any) -> Any:
                out = model(input_ids=i, past_key_values=cache, use_cache=True)
                return out.logits

            seconds = time_steps(hf_step, ids, positions, args.steps)
            del cache
    torch.cuda.empty_cache()
    return {"seconds_per_step": seconds, **extra}


def bench_folder(
    folder: Path, args: argparse.Namespace, bandwidth: float, rows: list[dict[str, Any]], save: Callable[[], None]
) -> None:
    """Append a row per cell to `rows`, saving after each: a run cut short by its time limit keeps what it measured."""
    import onnx
    import torch
    from dsv3c.artifact.manifest import read_manifest
    from dsv3c.models.config import DeepseekV3Config
    from dsv3c.onnxkit.session import UNPACKED_QMOE, cuda_qmoe_weight_names
    from dsv3c.runtime.ort_backend import TORCH_TYPES

    start = time.perf_counter()
    size = fill_if_weightless(folder, seed=args.seed)
    if size is not None:
        print(f"{folder}: filled {size / 2**30:.1f} GiB of random weights in {time.perf_counter() - start:.0f} s")
    manifest = read_manifest(folder)
    decode = onnx.load(manifest.graph_path("decode"), load_external_data=False).graph
    qmoe_packed = bool(cuda_qmoe_weight_names(decode)) and os.environ.get(UNPACKED_QMOE) != "1"
    config = DeepseekV3Config.from_dict(manifest.config)
    dtype = TORCH_TYPES[manifest.cache.dtype]
    cache_per_token = (manifest.cache.ckv_width + manifest.cache.kpe_width) * manifest.cache.layers * dtype.itemsize
    made: dict[str, Any] = {"config": config, "dtype": dtype}
    for runtime in args.runtimes:
        for batch in args.batches:
            for context in args.contexts:
                label = f"{folder.name} {runtime} batch {batch} context {context}"
                free_gib = torch.cuda.mem_get_info()[0] / 2**30
                try:
                    cell = measure_cell(runtime, folder, made, batch, context, args)
                except Exception as e:  # a runtime that cannot run a cell: say so in one line and go on
                    text = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                    print(f"{label}: skipped ({type(e).__name__}: {text})", flush=True)
                    rows.append(
                        {"model": folder.name, "runtime": runtime, "batch": batch, "context": context, "skipped": text}
                    )
                    save()
                    continue
                weights, distinct = weight_bytes(manifest, batch)
                step_bytes = weights + batch * context * cache_per_token
                floor_s = step_bytes / bandwidth
                s = cell.pop("seconds_per_step")
                row = {
                    "model": folder.name,
                    "dtype": manifest.cache.dtype,
                    "runtime": runtime,
                    "batch": batch,
                    "context": context,
                    "ms_per_step": s * 1e3,
                    "tokens_per_s": batch / s,
                    "floor_ms": floor_s * 1e3,
                    "x_floor": s / floor_s,
                    "bytes_per_step": step_bytes,
                    "bytes_per_token": step_bytes / batch,
                    "weight_bytes_per_step": weights,
                    "distinct_experts": distinct,
                    "gpu_free_gib_before": free_gib,
                    "capture_settings": args.capture_settings,
                    "qmoe_packed": qmoe_packed,
                    **cell,
                }
                rows.append(row)
                save()
                print(
                    f"{label}: {s * 1e3:.2f} ms/step ({row['x_floor']:.1f}x floor {floor_s * 1e3:.3f} ms), "
                    f"{row['tokens_per_s']:.0f} tok/s"
                    + (f", session opened in {cell['session_load_s']:.1f} s" if "session_load_s" in cell else ""),
                    flush=True,
                )
        made.pop("ort", None)
        made.pop(runtime, None)
        torch.cuda.empty_cache()


def run_apart(folder: Path, runtime: str, args: argparse.Namespace, bandwidth: float) -> list[dict[str, Any]]:
    """One runtime of one folder in a process of its own: onnxruntime aborts the process on some CUDA errors
    (a failed cudaFreeHost after a capture), and each runtime's memory goes back to the device when it ends.
    Cells a dead process did not measure are reported as skipped."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        command = [sys.executable, __file__, str(folder), "--in-process", "--runtimes", runtime, "--bandwidth"]
        command += [repr(bandwidth), "--steps", str(args.steps), "--seed", str(args.seed), "--out", str(out)]
        command += ["--contexts", *map(str, args.contexts), "--batches", *map(str, args.batches)]
        command += ["--capture-settings", args.capture_settings]
        code = subprocess.run(command, check=False).returncode
        rows: list[dict[str, Any]] = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(r["batch"], r["context"]) for r in rows}
    for batch in args.batches:
        for context in args.contexts:
            if (batch, context) not in done:
                text = f"the process ended with code {code} before this cell"
                print(f"{folder.name} {runtime} batch {batch} context {context}: skipped ({text})", flush=True)
                rows.append(
                    {"model": folder.name, "runtime": runtime, "batch": batch, "context": context, "skipped": text}
                )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cells: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if "ms_per_step" in r:
            cells.setdefault((r["model"], r["batch"], r["context"]), {})[r["runtime"]] = r
    runtimes = [rt for rt in RUNTIMES if any(rt in c for c in cells.values())]
    head = "| model | batch | context | floor ms | " + " | ".join(f"{rt} ms (x floor)" for rt in runtimes)
    lines = [head + " | ort-graph tok/s | vs torch |", "|" + "---|" * (5 + len(runtimes) + 1)]
    for (model, batch, context), c in sorted(cells.items()):
        floor = next(iter(c.values()))["floor_ms"]
        parts = [f"{c[rt]['ms_per_step']:.2f} ({c[rt]['x_floor']:.1f}x)" if rt in c else "-" for rt in runtimes]
        g = c.get("ort-graph")
        speedup = f"{c['torch']['ms_per_step'] / g['ms_per_step']:.1f}x" if g and "torch" in c else "-"
        tps = f"{g['tokens_per_s']:.0f}" if g else "-"
        lines.append(
            f"| {model} | {batch} | {context} | {floor:.3f} | " + " | ".join(parts) + f" | {tps} | {speedup} |"
        )
    return "\n".join(lines)


def main() -> int:
    import_dsv3c()
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", type=Path, nargs="+", help="`lower --target ort` folders (weights none: filled)")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per cell (after 3 untimed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", default="", help="the commit measured (recorded in the results)")
    p.add_argument("--out", type=Path, help="write the rows and the run's command, commit and machine as JSON")
    p.add_argument(
        "--capture-settings",
        choices=CAPTURE_SETTINGS,
        default="default",
        help="StaticDecoder's session settings (bench/capture_variants.py)",
    )
    p.add_argument("--in-process", action="store_true", help="every runtime in this process (default: one each)")
    p.add_argument("--bandwidth", type=float, help=argparse.SUPPRESS)  # a child takes its parent's measurement
    args = p.parse_args()
    if no_cuda("gpu_decode"):
        return 2
    import onnxruntime as ort
    from dsv3c.errors import UserError
    from dsv3c.runtime.bench.memory import device_bandwidth

    torch.backends.cuda.matmul.allow_tf32 = True  # onnxruntime's CUDA EP runs fp32 MatMul in TF32 as well
    bandwidth = args.bandwidth or device_bandwidth()
    if args.bandwidth is None:
        print(f"device copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows: list[dict[str, Any]] = []

    def save() -> None:
        if args.out is None:
            return
        result = {
            "command": "python bench/gpu_decode.py " + " ".join(sys.argv[1:]),
            "commit": args.commit,
            "machine": {
                "gpu": torch.cuda.get_device_name(),
                "host": platform.node(),
                "onnxruntime": ort.__version__,
                "torch": torch.__version__,
                "bandwidth_bytes_per_s": bandwidth,
            },
            "rows": rows,
        }
        partial = args.out.with_name(args.out.name + ".partial")  # a reader never sees half a file
        partial.write_text(json.dumps(result, indent=1) + "\n")
        partial.replace(args.out)

    try:
        for folder in args.folders:
            if args.in_process:
                bench_folder(folder, args, bandwidth, rows, save)
                continue
            for runtime in args.runtimes:
                rows += run_apart(folder, runtime, args, bandwidth)
                save()
    except UserError as e:
        print(f"gpu_decode: error: {e}", file=sys.stderr)
        return 2
    if args.bandwidth is None:  # not a child's rows
        print(table(rows))
    if args.out is not None and args.bandwidth is None:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
