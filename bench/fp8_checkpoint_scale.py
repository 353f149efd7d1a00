"""An FP8 checkpoint in DeepSeek-V3's own layout, cut to a few layers, through export and quantize at full size.

    python bench/fp8_checkpoint_scale.py --layers 3 --dir /work/scratch [--json --out bench/results/X.json]

Writes a random FP8 checkpoint with V3's names, shapes and sharding (model-0000k-of-0000n.safetensors of
~4.3 GB + model.safetensors.index.json; e4m3 weights with float32 weight_scale_inv per 128x128 block,
bf16 embeddings, norms and router, the float32 e_score_correction_bias), then runs `dsv3c export --dtype
bf16` and `dsv3c quantize` as subprocesses and reports for each: seconds, GB/s (checkpoint bytes over
seconds) and peak RSS (the child's ru_maxrss: anonymous and file-backed pages). One MoE layer of V3 is
~11.5B parameters (256 experts of 3 x 7168 x 2048), ~11.7 GB in FP8; `--layers 3` (one dense, two MoE)
is ~27 GB, larger than a 24 GB machine's RAM.

The weights are checked independently of dsv3c's readers and writers: the safetensors headers and the
ONNX external data (location, offset, length) are parsed here, and every FP8 weight and scale of the
checkpoint is compared byte for byte, in chunks, with its slot in the export (an expert at its index of
the stacked slot), then every FP8 slot of the quantized folder with the export's. The checkpoint is
deleted before quantize runs unless --keep (disk: checkpoint + export + quantized would be 3x).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import import_dsv3c

import_dsv3c()

SHARD_BYTES = 4_300_000_000  # about DeepSeek-V3's shard size (163 shards for 689 GB)
POOL_BYTES = 1 << 26  # random bytes reused at random offsets: the data is disk-bound, not RNG-bound
CHUNK = 1 << 26
_DTYPES = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def v3_config(layers: int) -> Any:
    from dsv3c.models.config import DeepseekV3Config, Fp8Quantization

    config = DeepseekV3Config.from_preset("v3")
    return config.replace(
        num_hidden_layers=layers,
        first_k_dense_replace=min(config.first_k_dense_replace, 1),
        num_nextn_predict_layers=0,
        quantization_config=Fp8Quantization((128, 128)),
    )


def tensor_plan(config: Any) -> list[tuple[str, str, tuple[int, ...]]]:
    """(checkpoint name, safetensors dtype, shape) of every tensor DeepSeek's FP8 checkpoint stores."""
    from dsv3c.models.checkpoint_layout import BIAS_FP32, checkpoint_name, is_fp8_weight, parameter_shapes
    from dsv3c.models.fp8 import scale_shape

    out = []
    for ours, shape in parameter_shapes(config).items():
        name = checkpoint_name(ours, config)
        if is_fp8_weight(ours) and len(shape) == 2:
            out.append((name, "F8_E4M3", shape))
            out.append((name + "_scale_inv", "F32", scale_shape(shape, (128, 128))))
        else:
            out.append((name, "F32" if ours.endswith(BIAS_FP32) else "BF16", shape))
    return out


def _pool(rng: np.random.Generator) -> bytes:
    """Random bytes that are valid E4M3 (no NaN: 0x7f / 0xff) and valid bf16 (NaN patterns removed too)."""
    a = rng.integers(0, 256, POOL_BYTES, dtype=np.uint8)
    a[(a & 0x7F) == 0x7F] = 0x3C
    return a.tobytes()


def _scales(rng: np.random.Generator, shape: tuple[int, ...]) -> bytes:
    return (2.0 ** rng.uniform(-14, -6, size=shape)).astype(np.float32).tobytes()


def write_checkpoint(folder: Path, config: Any, seed: int) -> dict[str, Any]:
    """Shards written by hand in the safetensors format (8-byte header size, JSON header, raw data)."""
    rng = np.random.default_rng(seed)
    pool = _pool(rng)
    plan = tensor_plan(config)
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in plan:
        nbytes = math.prod(entry[2]) * _DTYPES[entry[1]]
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    folder.mkdir(parents=True)
    config.save(folder / "config.json")
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, dtype, shape in shard:
            nbytes = math.prod(shape) * _DTYPES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / file, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for name, dtype, shape in shard:
                nbytes = math.prod(shape) * _DTYPES[dtype]
                if name.endswith("_scale_inv"):
                    f.write(_scales(rng, shape))
                    continue
                written = 0
                while written < nbytes:
                    start = int(rng.integers(0, POOL_BYTES // 2))
                    piece = min(nbytes - written, POOL_BYTES - start)
                    f.write(pool[start : start + piece])
                    written += piece
        total += (folder / file).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"shards": len(shards), "tensors": len(plan), "bytes": total}


def _safetensors_entries(folder: Path) -> dict[str, tuple[Path, int, int, str, list[int]]]:
    """name -> (file, absolute offset, length, dtype, shape), from the headers parsed here."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                out[name] = (path, 8 + n + start, end - start, info["dtype"], info["shape"])
    return out


def _onnx_slots(folder: Path) -> dict[str, tuple[Path, int, int, int]]:
    """initializer -> (file, offset, length, ONNX type), from the graphs' external data."""
    import onnx

    out = {}
    for role in ("prefill", "decode", "mtp"):
        if not (folder / f"{role}.onnx").is_file():
            continue
        for t in onnx.load(folder / f"{role}.onnx", load_external_data=False).graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                out[t.name] = (folder / info["location"], int(info["offset"]), int(info["length"]), t.data_type)
    return out


def _digest(path: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            data = f.read(min(CHUNK, left))
            if not data:
                raise SystemExit(f"{path}: ends before offset {offset} + {length}")
            h.update(data)
            left -= len(data)
    return h.hexdigest()


def _stacked(name: str) -> tuple[str, int] | None:
    parts = name.split(".mlp.experts.")
    if len(parts) != 2 or not parts[1].split(".")[0].isdigit():
        return None
    e, rest = parts[1].split(".", 1)
    return f"{parts[0]}.mlp.experts.{rest}", int(e)


def check_export(ckpt: Path, export: Path) -> dict[str, Any]:
    """Every F8_E4M3 tensor and its scales of the checkpoint, byte for byte in its export slot."""
    stored, slots = _safetensors_entries(ckpt), _onnx_slots(export)
    compared, nbytes, differ = 0, 0, []
    for name, (path, offset, length, _, _) in stored.items():
        base = name.removesuffix("_scale_inv")
        if stored[base][3] != "F8_E4M3":
            continue
        stacked = _stacked(base)
        suffix = name[len(base) :]
        slot_name, index = (stacked[0] + suffix, stacked[1]) if stacked else (name, 0)
        if slot_name not in slots:
            differ.append(f"{name}: no slot {slot_name}")
            continue
        file, slot_offset, _, _ = slots[slot_name]
        if _digest(path, offset, length) != _digest(file, slot_offset + index * length, length):
            differ.append(name)
        compared += 1
        nbytes += length
    return {"tensors_compared": compared, "bytes_compared": nbytes, "differing": differ[:10], "identical": not differ}


def check_quantized(export: Path, quantized: Path) -> dict[str, Any]:
    """Every FP8 slot of the export (and its scales), byte for byte in the quantized folder."""
    import onnx

    before, after = _onnx_slots(export), _onnx_slots(quantized)
    fp8 = [n for n, s in before.items() if s[3] == onnx.TensorProto.FLOAT8E4M3FN]
    differ = []
    for name in fp8 + [n + "_scale_inv" for n in fp8]:
        a, b = before[name], after.get(name)
        if b is None or a[2] != b[2] or _digest(a[0], a[1], a[2]) != _digest(b[0], b[1], b[2]):
            differ.append(name)
    return {"fp8_slots_compared": len(fp8), "differing": differ[:10], "identical": not differ}


def _rss_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of a running process in KiB: what it allocated vs file pages it has mapped."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0, 0
    fields = {k: v for k, _, v in (line.partition(":") for line in lines)}
    return int(fields.get("RssAnon", "0 kB").split()[0]), int(fields.get("RssFile", "0 kB").split()[0])


def run_timed(argv: list[str]) -> dict[str, Any]:
    """Run a dsv3c command as a child: wall seconds, peak RSS (ru_maxrss of that child alone) and, sampled
    every 0.2 s, its peak anonymous memory (file pages of mapped inputs are reclaimable, anonymous are not)."""
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "dsv3c", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    anon = file = 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        a, f = _rss_kib(child.pid)
        anon, file = max(anon, a), max(file, f)
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    out, err = child.stdout.read(), child.stderr.read()  # type: ignore[union-attr]
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"dsv3c {' '.join(argv)} failed ({code}): {err.strip()[-2000:]}")
    return {
        "argv": argv,
        "seconds": seconds,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "peak_rss_anon_bytes_sampled": anon * 1024,
        "peak_rss_file_bytes_sampled": file * 1024,
        "stdout": out.strip(),
    }


def _commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=3, help="decoder layers of V3 kept (the first dense, the rest MoE)")
    p.add_argument("--dir", type=Path, required=True, help="scratch folder on the disk to measure (must not exist)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the checkpoint for quantize and all folders at the end")
    p.add_argument("--json", action="store_true", help="print (or with --out write) the result as JSON")
    p.add_argument("--out", type=Path, help="with --json: the result file")
    args = p.parse_args()
    if args.dir.exists():
        raise SystemExit(f"{args.dir} exists; give a new scratch folder")
    ckpt, export, quantized = args.dir / "ckpt", args.dir / "export", args.dir / "quantized"
    config = v3_config(args.layers)
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": _commit(),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM)",
        "load_avg_1m_at_start": os.getloadavg()[0],
        "layers": args.layers,
    }
    try:
        start = time.perf_counter()
        result["checkpoint"] = {**write_checkpoint(ckpt, config, args.seed), "seconds": time.perf_counter() - start}
        size = result["checkpoint"]["bytes"]
        print(f"checkpoint: {size / 1e9:.1f} GB in {result['checkpoint']['shards']} shards", file=sys.stderr)
        exp = run_timed(["export", str(ckpt), "--out", str(export), "--dtype", "bf16"])
        exp["gb_per_s"] = size / 1e9 / exp["seconds"]
        exp["folder_bytes"] = sum(f.stat().st_size for f in export.iterdir())
        result["export"] = exp
        print(f"export: {exp['seconds']:.0f} s, peak RSS {exp['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
        result["export_check"] = check_export(ckpt, export)
        print(f"export check: {result['export_check']}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(ckpt)
        q = run_timed(["quantize", str(export), "--out", str(quantized)])
        q["gb_per_s"] = exp["folder_bytes"] / 1e9 / q["seconds"]
        result["quantize"] = q
        print(f"quantize: {q['seconds']:.0f} s, peak RSS {q['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
        result["quantize_check"] = check_quantized(export, quantized)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    text = json.dumps(result, indent=1) + "\n"
    if args.json and args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text if args.json else json.dumps({k: result[k] for k in ("export_check", "quantize_check")}))
    return 0 if result["export_check"]["identical"] and result["quantize_check"]["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
