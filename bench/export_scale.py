"""Export the DeepSeek-V3 topology with `--weights none` at several depths; print seconds and peak RSS.

    python bench/export_scale.py [--layers 4 8 16 61] [--out /tmp/dsv3c-bench]

Each depth runs in its own subprocess, so peak RSS (ru_maxrss of the child) is that export's alone.
The goal (issue 3): 61 layers in under 3 minutes and 4 GB on a 2-core, 24 GB machine, linear in depth.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(layers: int, out: Path) -> dict[str, float]:
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_config, from_preset

    source = from_preset("v3")
    if layers != source.config.num_hidden_layers:
        dense = min(source.config.first_k_dense_replace, layers)
        source = from_config(
            source.config.replace(num_hidden_layers=layers, first_k_dense_replace=dense), f"v3-{layers}"
        )
    start = time.perf_counter()
    export(source, out, weights="none", force=True)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"layers": layers, "seconds": seconds, "peak_rss_bytes": rss, "folder_bytes": size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 61])
    p.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: one depth, JSON on stdout
    args = p.parse_args()
    scratch = args.out or Path(tempfile.mkdtemp(prefix="dsv3c-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        print(json.dumps(one(args.one, scratch / f"v3-{args.one}")))
        return 0
    print(f"{'layers':>6} {'seconds':>8} {'peak RSS':>10} {'folder':>9}")
    try:
        for n in args.layers:
            start = time.perf_counter()
            child = subprocess.run(
                [sys.executable, __file__, "--one", str(n), "--out", str(scratch)],
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode:
                print(f"{n:>6} failed after {time.perf_counter() - start:.0f} s:\n{child.stderr[-2000:]}")
                return 1
            r = json.loads(child.stdout.strip().splitlines()[-1])
            rss, size = r["peak_rss_bytes"] / 2**30, r["folder_bytes"] / 2**20
            print(f"{n:>6} {r['seconds']:>8.1f} {rss:>8.2f} GB {size:>6.1f} MB")
    finally:
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
