"""Fill a `--weights none` export folder with random weights, in place (see dsv3c.runtime.random_weights).

python bench/fill_random_weights.py EXPORT_DIR [--seed 0] [--std 0.02] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _bootstrap import import_dsv3c


def main() -> int:
    import_dsv3c()
    from dsv3c.errors import UserError
    from dsv3c.runtime.random_weights import fill_random

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="export folder written with --weights none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02, help="standard deviation of every non-norm weight")
    p.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda is faster)")
    args = p.parse_args()
    start = time.perf_counter()
    try:
        size = fill_random(args.folder, args.seed, args.std, args.device)
    except UserError as e:
        print(f"fill_random_weights: error: {e}", file=sys.stderr)
        return 2
    print(f"filled {args.folder}: {size / 2**30:.2f} GiB in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
